"""Operator-level safety configuration, parsed from the launch flags."""
from __future__ import annotations

import dataclasses
from pathlib import Path

PLUGINS = ("tokenwise",)
MODES = ("shadow",)  # enforce arrives with the veto/re-draw policy


class ConfigError(ValueError):
    """Bad safety configuration; the message is one line saying what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    probe_path: Path
    mode: str = "shadow"
    threshold: float | None = None  # None: the probe's calibrated threshold

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"--safety-mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"--safety-threshold {self.threshold} must lie strictly between 0 and 1")

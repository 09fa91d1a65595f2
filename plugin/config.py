"""Operator-level safety configuration, parsed from the launch flags."""
from __future__ import annotations

import dataclasses
from pathlib import Path

PLUGINS = ("tokenwise",)
MODES = ("shadow", "enforce")
ON_ERROR = ("fail-closed", "fail-open")  # what a failed scoring step does to its requests
TRACE_DETAILS = ("full", "scores", "decisions")  # trace shown to requests without the operator key
DEFAULT_PIVOT = "I can't help with that, but I can offer safe, general information instead. "


class ConfigError(ValueError):
    """Bad safety configuration; the message is one line saying what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class SafetyConfig:
    probe_path: Path
    mode: str = "shadow"
    threshold: float | None = None  # None: the probe's calibrated threshold
    top_k: int = 20  # re-draw candidates kept per position
    max_vetoes: int = 3  # vetoes at one position before the pivot
    pivot: str = DEFAULT_PIVOT
    keep_overlap: bool = False  # shadow only: keep SGLang's overlap scheduler
    client_override: bool = False
    scorer: str = "probe"
    window: int | None = None  # None: the probe's calibrated window
    on_error: str = "fail-closed"
    trace_detail: str = "decisions"

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"--safety-mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ConfigError(f"--safety-threshold {self.threshold} must lie strictly between 0 and 1")
        if self.top_k < 1:
            raise ConfigError(f"--safety-top-k {self.top_k} must be at least 1")
        if self.window is not None and not 1 <= self.window <= 8:
            raise ConfigError(f"--safety-window {self.window} must be between 1 and 8")
        if self.max_vetoes < 0:
            raise ConfigError(f"--safety-max-vetoes {self.max_vetoes} must be 0 or more")
        if not self.pivot.strip():
            raise ConfigError("--safety-pivot must not be empty")
        if self.keep_overlap and self.mode == "enforce":
            raise ConfigError("--safety-keep-overlap-schedule cannot be used with --safety-mode enforce: "
                              "a veto must land before the next step is launched")
        if self.on_error not in ON_ERROR:
            raise ConfigError(f"--safety-on-error {self.on_error!r} is not one of {', '.join(ON_ERROR)}")
        if self.trace_detail not in TRACE_DETAILS:
            raise ConfigError(f"--safety-trace-detail {self.trace_detail!r} is not one of {', '.join(TRACE_DETAILS)}")
        if self.scorer != "probe" and not self.scorer.startswith("token-ids:"):
            raise ConfigError(f"--safety-scorer {self.scorer!r}: use 'probe' or 'token-ids:ID[,ID...]'")

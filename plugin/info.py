"""What a replica is running, for an operator watching a fleet: the plugin's version, the
probe artifact's identity, mode and threshold (served at /tokenwise/info and as the
Prometheus gauge tokenwise_safety_info)."""
from __future__ import annotations

from importlib import metadata

INFO_FIELDS = ("version", "probe_sha256", "mode", "threshold", "window", "scorer")


def plugin_version() -> str:
    try:
        return metadata.version("tokenwise-safety")
    except metadata.PackageNotFoundError:  # running from a checkout that was never installed
        return "unknown"


def describe(config: dict) -> dict:
    """The launch config's public identity; nothing secret is in it (the key never is)."""
    return {"plugin": "tokenwise-safety", "version": plugin_version(), "probe_path": config["probe_path"],
            "probe_sha256": config["probe_sha256"], "tensors_sha256": config["tensors_sha256"],
            "mode": config["mode"], "threshold": config["threshold"], "window": config["window"],
            "scorer": config["scorer"], "client_override": config["client_override"],
            "self_judge": config.get("judge", {"mode": "off"}), "draft_probe": _draft(config.get("draft"))}


def _draft(draft: dict | None) -> dict | None:
    """The draft model's probe (harmless-first drafting), or None."""
    return None if draft is None else {k: draft[k] for k in ("probe_path", "tensors_sha256", "threshold")}

"""Per-request safety policy: a request may tighten the operator's policy, never loosen it
without the operator's override key.

The field is `custom_params.tokenwise_safety` in SGLang's sampling params (/generate:
`sampling_params.custom_params`; OpenAI endpoints: top-level `custom_params`):
    {"mode": "enforce" | "shadow" | "off", "threshold": 0.5, "override_key": "..."}
"""
from __future__ import annotations

import hmac
import math
import os

POLICY_KEY = "tokenwise_safety"
STRICTNESS = {"off": 0, "shadow": 1, "enforce": 2}
FIELD = f"custom_params.{POLICY_KEY}"
OVERRIDE_KEY_ENV = "TOKENWISE_SAFETY_OVERRIDE_KEY"  # read in the HTTP process only; never logged


class PolicyError(ValueError):
    """Invalid or refused per-request policy; the message names the field."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status_code = status


def resolve(requested, server: dict) -> dict | None:
    """Validate a request's policy against the server's; returns the effective policy
    ({"mode", "threshold"}) or None when the request names none."""
    if requested is None:
        return None
    if not isinstance(requested, dict):
        raise PolicyError(f"{FIELD} must be an object, got {type(requested).__name__}")
    unknown = set(requested) - {"mode", "threshold", "override_key"}
    if unknown:
        raise PolicyError(f"{FIELD} has unknown field(s) {sorted(unknown)}; allowed: mode, threshold, override_key")
    mode = requested.get("mode", server["mode"])
    if mode not in STRICTNESS:
        raise PolicyError(f"{FIELD}.mode must be one of {sorted(STRICTNESS)}, got {mode!r}")
    threshold = requested.get("threshold", server["threshold"])
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) \
            or not math.isfinite(threshold) or not 0.0 < threshold < 1.0:
        raise PolicyError(f"{FIELD}.threshold must be a number strictly between 0 and 1, got {threshold!r}")
    loosens = STRICTNESS[mode] < STRICTNESS[server["mode"]] or threshold > server["threshold"]
    if loosens and not _override_granted(requested.get("override_key"), server):
        raise PolicyError(
            f"{FIELD} loosens the operator's policy (mode {server['mode']}, threshold "
            f"{server['threshold']:.3f}); only a request presenting the operator's override key "
            f"may do that, and only when the server was launched with --safety-client-override "
            f"and {OVERRIDE_KEY_ENV} set",
            status=403)
    if mode == "enforce" and not server.get("enforce_possible"):
        raise PolicyError(f"{FIELD}.mode 'enforce' needs a server launched without "
                          "--safety-keep-overlap-schedule (enforcement needs the non-overlap loop)")
    return {"mode": mode, "threshold": float(threshold)}


def _override_granted(key, server: dict) -> bool:
    expected = os.environ.get(OVERRIDE_KEY_ENV, "")
    return (server.get("client_override", False) and bool(expected) and isinstance(key, str)
            and hmac.compare_digest(key.encode(), expected.encode()))

"""Scheduler-side admission of a request's policy: trust only what the HTTP side checked.

The HTTP process validates `custom_params.tokenwise_safety` (policy.resolve, with the
operator's key) and replaces it with the effective policy. Requests can also reach the
scheduler by other paths (SGLang's gRPC servicers send tokenized requests straight to it),
so the scheduler admits a policy only when it is well formed and either at least as
strict as the operator's, or stamped: a loosened policy carries an HMAC that the HTTP side
computed with a per-launch secret that never leaves the server's processes (it lives in
their environment, not in the server args, which SGLang logs). Anything else falls back
to the operator's policy and is counted.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets

from tokenwise_safety.policy import STRICTNESS, loosens_policy

STAMP_ENV = "TOKENWISE_SAFETY_STAMP_SECRET"  # set once by the launcher, inherited by children
STAMP_FIELD = "stamp"


def ensure_secret() -> None:
    """Create the per-launch secret in this (launcher) process before children start."""
    os.environ.setdefault(STAMP_ENV, secrets.token_hex(32))


def _mac(mode: str, threshold: float) -> str:
    key = os.environ.get(STAMP_ENV, "")
    if not key:
        return ""
    return hmac.new(key.encode(), f"{mode}|{threshold!r}".encode(), hashlib.sha256).hexdigest()


def stamp(policy: dict) -> dict:
    """HTTP side: the effective policy ({"mode", "threshold"}) with its stamp."""
    return {**policy, STAMP_FIELD: _mac(policy["mode"], float(policy["threshold"]))}


def admit(raw, operator: dict) -> tuple[dict, bool]:
    """Scheduler side: (policy to apply, trusted). Untrusted input gives the operator's
    policy ({"mode", "threshold"} of the launch config) and False."""
    fallback = {"mode": operator["mode"], "threshold": float(operator["threshold"])}
    if raw is None:
        return fallback, True
    if not isinstance(raw, dict) or set(raw) - {"mode", "threshold", STAMP_FIELD}:
        return fallback, False
    mode, threshold = raw.get("mode", operator["mode"]), _number(raw.get("threshold", operator["threshold"]))
    if not isinstance(mode, str) or mode not in STRICTNESS or threshold is None or not 0.0 < threshold < 1.0:
        return fallback, False
    policy = {"mode": mode, "threshold": threshold}
    if mode == "enforce" and not operator.get("enforce_possible", True):
        return fallback, False
    if not loosens_policy(mode, threshold, operator):
        return policy, True
    mac = raw.get(STAMP_FIELD)
    expected = _mac(mode, policy["threshold"])
    if isinstance(mac, str) and expected and hmac.compare_digest(mac, expected):
        return policy, True
    return fallback, False


def _number(value) -> float | None:
    """A finite float, or None (bools, strings, NaN, inf and ints too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None

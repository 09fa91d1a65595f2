"""Per-request safety policy: a request may tighten the operator's policy, never loosen it
without the operator's override key.

The field is `custom_params.tokenwise_safety` in SGLang's sampling params (/generate:
`sampling_params.custom_params`; OpenAI endpoints: top-level `custom_params`):
    {"mode": "enforce" | "shadow" | "off", "threshold": 0.5, "override_key": "..."}
"""
from __future__ import annotations

import hmac
import os

POLICY_KEY = "tokenwise_safety"
STRICTNESS = {"off": 0, "shadow": 1, "enforce": 2}
FIELDS = ("mode", "threshold", "override_key")
FIELD = f"custom_params.{POLICY_KEY}"
OVERRIDE_KEY_ENV = "TOKENWISE_SAFETY_OVERRIDE_KEY"  # read in the HTTP process only; never logged
ECHO_CHARS = 40  # a refused value is echoed cut to this many characters


class PolicyError(ValueError):
    """Invalid or refused per-request policy; the message names the field."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status_code = status


class Resolved(dict):
    """An effective policy that resolve() checked: {"mode", "threshold"}, never the key.

    The type is the stamp: JSON only ever decodes to plain dicts, so a seam that finds a
    Resolved knows it was checked already (the OpenAI seam resolves before SGLang logs the
    request, the tokenizer seam then leaves it alone). `full_trace`: the request presented
    the operator's key, so it sees the full harm trace whatever --safety-trace-detail says.
    """
    full_trace = False


def resolve(requested, server: dict) -> Resolved | None:
    """Validate a request's policy against the server's; returns the effective policy
    or None when the request names none."""
    if requested is None or isinstance(requested, Resolved):
        return requested
    if not isinstance(requested, dict):
        raise PolicyError(f"{FIELD} must be an object, got {type(requested).__name__}")
    unknown = [k for k in requested if k not in FIELDS]
    if unknown:
        raise PolicyError(f"{FIELD} has unknown field(s) {echo(sorted(map(str, unknown)))}; "
                          f"allowed: {', '.join(FIELDS)}")
    mode = requested.get("mode", server["mode"])
    if not isinstance(mode, str) or mode not in STRICTNESS:
        raise PolicyError(f"{FIELD}.mode must be one of {sorted(STRICTNESS)}, got {echo(mode)}")
    threshold = requested.get("threshold", server["threshold"])
    # Only floats: no int lies strictly between 0 and 1, and float() of a huge int overflows.
    if not isinstance(threshold, float) or not 0.0 < threshold < 1.0:  # NaN fails the range
        raise PolicyError(f"{FIELD}.threshold must be a number strictly between 0 and 1, "
                          f"got {echo(threshold)}")
    granted = _override_granted(requested.get("override_key"), server)
    loosens = loosens_policy(mode, threshold, server)
    if loosens and not granted:
        raise PolicyError(
            f"{FIELD} loosens the operator's policy (mode {server['mode']}, threshold "
            f"{server['threshold']:.3f}); only a request presenting the operator's override key "
            f"may do that, and only when the server was launched with --safety-client-override "
            f"and {OVERRIDE_KEY_ENV} set",
            status=403)
    if mode == "enforce" and not server.get("enforce_possible"):
        raise PolicyError(f"{FIELD}.mode 'enforce' needs a server launched without "
                          "--safety-keep-overlap-schedule (enforcement needs the non-overlap loop)")
    effective = Resolved(mode=mode, threshold=float(threshold))
    effective.full_trace = granted
    return effective


def loosens_policy(mode: str, threshold: float, server: dict) -> bool:
    """A laxer mode or a higher threshold than the operator's (the HTTP and scheduler checks share it)."""
    return STRICTNESS[mode] < STRICTNESS[server["mode"]] or threshold > server["threshold"]


def echo(value) -> str:
    """A client's value for an error message: repr, cut to ECHO_CHARS."""
    text = repr(value)
    return text if len(text) <= ECHO_CHARS else text[:ECHO_CHARS - 3] + "..."


def _override_granted(key, server: dict) -> bool:
    expected = os.environ.get(OVERRIDE_KEY_ENV, "")
    return (server.get("client_override", False) and bool(expected) and isinstance(key, str)
            and hmac.compare_digest(key.encode("utf-8", "surrogatepass"), expected.encode()))

"""Seam: the tokenizer manager. Checks each request's policy and shapes the harm trace a
client sees.

AFTER hook on TokenizerManager.update_request_meta_info, which SGLang calls for every
output it forwards and documents as the place for terminal data: when the request has
finished, meta_info["tokenwise_safety"] gets the summary of its whole harm trace.
AROUND hook on generate_request: validates the policy field before SGLang logs or tokenizes
the request (the override key never goes further), then passes every output through
ClientView, the one place that decides what of the trace leaves the server, and remembers
each choice's last meta_info for the OpenAI streaming seam.
"""
from __future__ import annotations

import weakref

from tokenwise_safety import admission, metrics
from tokenwise_safety.policy import POLICY_KEY, PolicyError, Resolved, resolve
from tokenwise_safety.trace import (INTERVENTION_KEY, JUDGE_KEY, SUMMARY_KEY, TRACE_KEY, interventions_of,
                                    judge_calls_of, redact_intervention, redact_judge_records, redact_summary,
                                    summarize)

from .enforce import LATE_RECORDS, STOP_RECORD
from .server_args import ATTR

UPDATE_META = "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info"
GENERATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request"
LAST_META_ATTR = "_tokenwise_last_meta"
PER_TOKEN_KEYS = (TRACE_KEY, INTERVENTION_KEY, JUDGE_KEY)

# rid -> SGLang's ReqState, for ClientView: the state holds the whole accumulated trace,
# which an output's meta_info may only hold a slice of. Weak: it lives as long as SGLang
# keeps the request.
_LIVE: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()


def after_update_meta(result, manager, meta_info, state, customized_info, index, finish_reason, *a, **kw):
    config = getattr(manager.server_args, ATTR, None)
    if config is None:
        return result
    _LIVE[meta_info["id"]] = state
    if finish_reason is None:
        return result
    scores = state.customized_info_accumulated.get(TRACE_KEY)
    if scores is None:
        return result
    policy = _policy_of(state.obj, index) or config
    if policy["mode"] == "off":
        for key in PER_TOKEN_KEYS:
            meta_info.pop(key, None)
        return result
    entries = interventions_of(state.customized_info_accumulated.get(INTERVENTION_KEY))
    stop = finish_reason.pop(STOP_RECORD, None)  # a request the plugin ended: its closing record
    late = finish_reason.pop(LATE_RECORDS, [])  # final interventions past SGLang's per-token cut
    judged = state.customized_info_accumulated.get(JUDGE_KEY)
    summary = summarize(scores, policy["threshold"], policy["mode"], entries + late + ([stop] if stop else []),
                        config["window"], judge_calls_of(judged) if judged is not None else None)
    meta_info[SUMMARY_KEY] = summary
    if summary["first_over_threshold"] is not None:
        metrics.count_flagged_request()
    return result


def _policy_of(obj, index: int = 0) -> dict | None:
    params = obj.sampling_params
    if isinstance(params, list):
        params = params[index] if index < len(params) else None
    custom = (params or {}).get("custom_params")
    return custom.get(POLICY_KEY) if isinstance(custom, dict) else None


def apply_request_policy(obj, config: dict) -> None:
    """Validate each request's policy field and replace it with the effective policy, which
    carries no override key (raises PolicyError, a ValueError SGLang answers with its
    status code)."""
    params = obj.sampling_params
    for sp in params if isinstance(params, list) else [params]:
        if not isinstance(sp, dict) or sp.get("custom_params") is None:
            continue
        custom = sp["custom_params"]
        if not isinstance(custom, dict):
            raise PolicyError(f"custom_params must be an object, got {type(custom).__name__}")
        effective = resolve(custom.get(POLICY_KEY), config)
        if effective is not None:  # stamped: the scheduler trusts only what was checked here
            sp["custom_params"] = {**custom, POLICY_KEY: _stamped(effective)}


def _stamped(effective: Resolved) -> Resolved:
    """The scheduler's stamp on the effective policy, kept a Resolved (with its trace grant)
    for this process."""
    stamped = Resolved(admission.stamp(effective))
    stamped.full_trace = effective.full_trace
    return stamped


class ClientView:
    """What of the harm trace one request's client sees.

    Detail: "full" for a request that presented the operator key, else the operator's
    --safety-trace-detail (see tokenwise_safety.trace). Mode off: no trace at all.

    Streaming (/generate with "stream": true): each chunk's `harm_score` and
    `harm_intervention` hold only the entries new since the previous chunk, so the stream
    grows linearly; concatenating them gives the non-streamed lists, and the final chunk
    also carries the summary. Deltas rather than the whole trace at the end, so a client
    watching a shadow-mode stream can act on a score as soon as it exists. SGLang's
    `--incremental-streaming-output` gets the same deltas (its own slicing follows the
    output ids, which enforce holds back by one pending token, so it is replaced here).
    """

    def __init__(self, config: dict, stream: bool):
        self.config, self.stream = config, stream
        self.sent: dict[tuple[str, str], int] = {}  # (rid, key) -> entries already sent

    def apply(self, meta: dict) -> dict:
        """Shape `meta` for the client in place; returns the meta_info to remember for the
        OpenAI streaming seam (whole per-token lists, same detail)."""
        if not any(k in meta for k in (SUMMARY_KEY, *PER_TOKEN_KEYS)):
            return meta
        state = _LIVE.get(meta.get("id"))
        policy = (_policy_of(state.obj) if state is not None else None) or self.config
        if state is None or policy["mode"] == "off":
            for key in (SUMMARY_KEY, *PER_TOKEN_KEYS):
                meta.pop(key, None)
            return meta
        detail = "full" if getattr(policy, "full_trace", False) else self.config["trace_detail"]
        if SUMMARY_KEY in meta:
            meta[SUMMARY_KEY] = redact_summary(meta[SUMMARY_KEY], detail)
        for key in PER_TOKEN_KEYS:
            values = state.customized_info_accumulated.get(key)
            if values is None or (key == TRACE_KEY and detail == "decisions"):
                meta.pop(key, None)
                continue
            start = self._advance(meta["id"], key, len(values)) if self.stream else 0
            meta[key] = _redact_entries(key, values[start:], detail)
        if not self.stream or TRACE_KEY not in meta:
            return meta
        return {**meta, TRACE_KEY: state.customized_info_accumulated[TRACE_KEY]}  # no copy: O(1) a chunk

    def _advance(self, rid: str, key: str, total: int) -> int:
        start = self.sent.get((rid, key), 0)
        self.sent[(rid, key)] = total
        return start


def _redact_entries(key: str, values: list, detail: str) -> list:
    if key == INTERVENTION_KEY and detail != "full":
        return [redact_intervention(e, detail) for e in values]
    if key == JUDGE_KEY:
        return [redact_judge_records(e, detail) for e in values]
    return list(values)


def around_generate(original, manager, obj, *args, **kwargs):
    """Check the request's policy, then pass outputs through the client view, keeping the
    last meta_info per choice index on the request (for the OpenAI streaming seam)."""
    config = getattr(manager.server_args, ATTR, None)

    async def stream():
        # Raised here, inside iteration, so SGLang's handlers turn it into a 4xx answer.
        if config is not None and hasattr(obj, "sampling_params"):
            refuse_hidden_states(obj, config)
            apply_request_policy(obj, config)
        view = ClientView(config, bool(getattr(obj, "stream", False))) if config is not None else None
        last = {}
        setattr(obj, LAST_META_ATTR, last)
        async for out in original(manager, obj, *args, **kwargs):
            for o in out if isinstance(out, list) else [out]:
                if isinstance(o, dict) and "meta_info" in o:
                    last[o.get("index", 0)] = view.apply(o["meta_info"]) if view else o["meta_info"]
            yield out
    return stream()


def refuse_hidden_states(obj, config: dict) -> None:
    """The plugin turns SGLang's hidden-state capture on for itself, which SGLang would then
    also grant to clients: refuse a client's request for them unless the operator enabled
    returning hidden states at launch."""
    wanted = getattr(obj, "return_hidden_states", False)
    if any(wanted) if isinstance(wanted, list) else wanted:
        if not config.get("client_hidden_states"):
            raise PolicyError("return_hidden_states: this server does not return hidden states "
                              "(launch with --enable-return-hidden-states to allow it)")


def trace_of(meta_info: dict) -> dict | None:
    """What clients of the OpenAI endpoints get per choice: summary plus per-token scores
    (where the trace detail shows them)."""
    summary = meta_info.get(SUMMARY_KEY)
    if summary is None:
        return None
    if TRACE_KEY not in meta_info:
        return dict(summary)
    return {**summary, "scores": list(meta_info[TRACE_KEY])}

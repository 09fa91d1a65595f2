"""Seam: the tokenizer manager. Adds the per-request harm summary to meta_info.

AFTER hook on TokenizerManager.update_request_meta_info, which SGLang calls for every
output it forwards and documents as the place for terminal data: when the request has
finished, meta_info["tokenwise_safety"] gets the summary of its whole harm trace.
AROUND hook on generate_request remembers each request's last meta_info so the OpenAI
streaming seam can send the summary in its final chunk.
"""
from __future__ import annotations

from tokenwise_safety import metrics
from tokenwise_safety.policy import POLICY_KEY, resolve
from tokenwise_safety.trace import INTERVENTION_KEY, SUMMARY_KEY, TRACE_KEY, interventions_of, summarize

from .server_args import ATTR

UPDATE_META = "sglang.srt.managers.tokenizer_manager.TokenizerManager.update_request_meta_info"
GENERATE = "sglang.srt.managers.tokenizer_manager.TokenizerManager.generate_request"
LAST_META_ATTR = "_tokenwise_last_meta"


def after_update_meta(result, manager, meta_info, state, customized_info, index, finish_reason, *a, **kw):
    config = getattr(manager.server_args, ATTR, None)
    if config is None or finish_reason is None:
        return result
    scores = state.customized_info_accumulated.get(TRACE_KEY)
    if scores is None:
        return result
    policy = _policy_of(state.obj, index) or config
    if policy["mode"] == "off":
        for key in (TRACE_KEY, INTERVENTION_KEY):
            meta_info.pop(key, None)
        return result
    entries = state.customized_info_accumulated.get(INTERVENTION_KEY)
    summary = summarize(scores, policy["threshold"], policy["mode"], interventions_of(entries),
                        config["window"])
    meta_info[SUMMARY_KEY] = summary
    if summary["first_over_threshold"] is not None:
        metrics.count_flagged_request()
    return result


def _policy_of(obj, index: int = 0) -> dict | None:
    params = obj.sampling_params
    if isinstance(params, list):
        params = params[index] if index < len(params) else None
    return ((params or {}).get("custom_params") or {}).get(POLICY_KEY)


def apply_request_policy(obj, config: dict) -> None:
    """Validate each request's policy field and replace it with the effective policy
    (raises PolicyError, a ValueError SGLang answers with its status code)."""
    params = obj.sampling_params
    for sp in params if isinstance(params, list) else [params]:
        if not isinstance(sp, dict):
            continue
        custom = sp.get("custom_params") or {}
        effective = resolve(custom.get(POLICY_KEY), config)
        if effective is not None:
            sp["custom_params"] = {**custom, POLICY_KEY: effective}


def around_generate(original, manager, obj, *args, **kwargs):
    """Check the request's policy, then pass outputs through, keeping the last meta_info
    per choice index on the request (for the OpenAI streaming seam)."""
    config = getattr(manager.server_args, ATTR, None)

    async def stream():
        # Raised here, inside iteration, so SGLang's handlers turn it into a 4xx answer.
        if config is not None and hasattr(obj, "sampling_params"):
            apply_request_policy(obj, config)
        last = {}
        setattr(obj, LAST_META_ATTR, last)
        async for out in original(manager, obj, *args, **kwargs):
            if isinstance(out, dict) and "meta_info" in out:
                last[out.get("index", 0)] = out["meta_info"]
            yield out
    return stream()


def trace_of(meta_info: dict) -> dict | None:
    """What clients of the OpenAI endpoints get per choice: summary plus per-token scores."""
    summary = meta_info.get(SUMMARY_KEY)
    if summary is None:
        return None
    return {**summary, "scores": list(meta_info.get(TRACE_KEY, []))}

"""Seam: the tokenizer manager. Adds the per-request harm summary to meta_info.

AFTER hook on TokenizerManager.update_request_meta_info, which SGLang calls for every
output it forwards and documents as the place for terminal data: when the request has
finished, meta_info["tokenwise_safety"] gets the summary of its whole harm trace.
AROUND hook on generate_request remembers each request's last meta_info so the OpenAI
streaming seam can send the summary in its final chunk.
"""
from __future__ import annotations

from tokenwise_safety import metrics
from tokenwise_safety.trace import SUMMARY_KEY, TRACE_KEY, summarize

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
    summary = summarize(scores, config["threshold"], config["mode"])
    meta_info[SUMMARY_KEY] = summary
    if summary["first_over_threshold"] is not None:
        metrics.count_flagged_request()
    return result


def around_generate(original, manager, obj, *args, **kwargs):
    """Pass outputs through; keep the last meta_info per choice index on the request."""
    async def stream():
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

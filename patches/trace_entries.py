"""Seam: the per-request customized_info collector. Keeps the harm trace aligned with the
tokens the client gets: a vetoed token's entries are dropped, a request the plugin ended
keeps one score per emitted token."""
from __future__ import annotations

from tokenwise_safety.trace import INTERVENTION_KEY, TRACE_KEY

from .enforce import state_of
from .spec_verify import SpliceList

COLLECT_INFO = ("sglang.srt.managers.scheduler_components.batch_result_processor."
                "SchedulerBatchResultProcessor._maybe_collect_customized_info")


def after_collect_info(result, processor, i, req, logits_output, *a, **kw):
    """A vetoed token's trace entries are not the output's: they live in the intervention.
    A request the plugin ended keeps one score per emitted token (its closing record
    travels in the finish reason: SGLang cuts per-token lists at the output length).
    A speculative step commits several tokens: its per-token lists are spliced in."""
    _splice(req.customized_info)
    st = state_of(req)
    if st is None or not (st.vetoed_now or st.stop is not None):
        return result
    st.vetoed_now = False
    info = req.customized_info or {}
    scores, entries = info.get(TRACE_KEY), info.get(INTERVENTION_KEY)
    if st.stop is not None and req.finished():
        for values in (scores, entries):
            if values is not None:
                del values[req.finished_len:]
        return result
    for values in (scores, entries):
        if values:
            values.pop()
    return result


def _splice(info: dict | None) -> None:
    for key in (TRACE_KEY, INTERVENTION_KEY):
        values = (info or {}).get(key)
        if values and isinstance(values[-1], SpliceList):
            values.extend(values.pop())

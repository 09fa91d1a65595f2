"""Seam: the per-request customized_info collector. Keeps the harm trace aligned with the
tokens the client gets: a vetoed token's entries are dropped, a request the plugin ended
keeps one score per emitted token."""
from __future__ import annotations

from tokenwise_safety.trace import INTERVENTION_KEY, JUDGE_KEY, TRACE_KEY, judge_calls_of

from .enforce import LATE_RECORDS, state_of
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
    if st is not None and st.stop is None and req.finished():
        _send_with_finish(req, _fold_final(req.customized_info, req.finished_len))
    if st is None or not (st.vetoed_now or st.stop is not None):
        return result
    st.vetoed_now = False
    info = req.customized_info or {}
    if st.stop is not None and req.finished():
        _send_with_finish(req, _cut_at_stop(info, req.finished_len))
        return result
    for values in (info.get(key) for key in (TRACE_KEY, INTERVENTION_KEY, JUDGE_KEY)):
        if values:
            values.pop()
    return result


def _splice(info: dict | None) -> None:
    for key in (TRACE_KEY, INTERVENTION_KEY):
        values = (info or {}).get(key)
        if values and isinstance(values[-1], SpliceList):
            values.extend(values.pop())


def _fold_final(info: dict | None, kept: int | None) -> list[dict]:
    """A held finish files the final position's records one step after the output's end,
    where SGLang's per-token lists are cut: they move into the last kept entry (an
    intervention only when that entry has none; judge records always). Returns the
    interventions no entry can hold (the one before the last position's sits there).
    Records about a position past the output (a speculative step drafts beyond
    max_tokens) are dropped: the client never gets that token."""
    if not info or not kept:
        return []
    judged = info.get(JUDGE_KEY)
    _add_judged(judged, kept, judge_calls_of(_within(v, kept) for v in (judged or [])[kept:]))
    return _fold_interventions(info, kept)


def _fold_interventions(info: dict, kept: int) -> list[dict]:
    """Interventions about output positions filed past the cut at `kept`: the first moves
    into the last kept entry when that has none; the rest are returned (late)."""
    values = info.get(INTERVENTION_KEY)
    tail = [v for v in (_within(v, kept) for v in (values or [])[kept:]) if v]
    if not tail:
        return []
    if values[kept - 1] is None:
        values[kept - 1], tail = tail[0], tail[1:]
    return tail


def _send_with_finish(req, records: list[dict]) -> None:
    """Interventions past SGLang's per-token cut ride in the finish reason (like a stop's
    closing record); patches/meta_info.py moves them into the summary."""
    if not records:
        return
    to_json = req.finished_reason.to_json
    req.finished_reason.to_json = lambda: {**to_json(), LATE_RECORDS: records}


def _cut_at_stop(info: dict, kept: int) -> list[dict]:
    """A request the plugin ended keeps one entry per emitted token. The judge passes of the
    withheld token's step (often the reason it ended) move into the last kept entry instead
    of being cut with it, and so does the last emitted position's intervention (filed past
    the cut, like a held finish's); with no token emitted there is no entry to keep them.
    Returns the interventions no kept entry can hold. The closing record itself (about the
    withheld position) travels in the finish reason."""
    late = []
    if kept:
        judged = info.get(JUDGE_KEY)
        _add_judged(judged, kept, judge_calls_of((judged or [])[kept:]))
        late = _fold_interventions(info, kept)
    for key in (TRACE_KEY, INTERVENTION_KEY, JUDGE_KEY):
        if info.get(key) is not None:
            del info[key][kept:]
    return late


def _add_judged(values: list, kept: int, records: list) -> None:
    if records:
        values[kept - 1] = (values[kept - 1] or []) + records


def _within(entry, kept: int):
    """The entry's records about output positions (an intervention is one dict, a judge
    entry a list of them)."""
    if isinstance(entry, dict):
        return entry if entry.get("position", 0) < kept else None
    return [r for r in entry or [] if r.get("position", 0) < kept]

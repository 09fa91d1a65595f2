"""Per-request harm trace: the summary a client sees beside its answer."""
from __future__ import annotations

from typing import Sequence

TRACE_KEY = "harm_score"  # per-token key in SGLang's customized_info / meta_info
SUMMARY_KEY = "tokenwise_safety"  # summary field in meta_info and OpenAI responses


def judged_harmful(scores: Sequence[float | None], threshold: float, window: int = 1) -> list[int]:
    """Positions judged harmful: the position and the window-1 before it (as many as
    exist) all score at or over the threshold. Same rule as the enforce step."""
    out, run = [], 0
    for i, s in enumerate(scores):
        run = run + 1 if s is not None and s >= threshold else 0
        if run and run >= min(window, i + 1):
            out.append(i)
    return out


def summarize(scores: Sequence[float | None], threshold: float, mode: str,
              interventions: Sequence[dict] = (), window: int = 1, judge_calls: Sequence[dict] | None = None) -> dict:
    """scores[0] judges the prompt (state after its last token); scores[i], i >= 1, judges
    output token i-1. The last output token's state is never computed (no forward follows
    it), so len(scores) == number of output tokens. "over threshold" counts positions
    judged harmful under the window rule (window 1: the position's own score)."""
    valid = [(i, s) for i, s in enumerate(scores) if s is not None]
    over = judged_harmful(scores, threshold, window)
    return {
        "mode": mode,
        "threshold": threshold,
        "window": window,
        "prompt_score": scores[0] if scores else None,
        "max_score": max((s for _, s in valid), default=None),
        "first_over_threshold": over[0] if over else None,
        "num_over_threshold": len(over),
        "num_scored": len(valid),
        "interventions": list(interventions),
        "num_vetoes": sum(len([v for v in x["vetoed"] if "token" in v]) for x in interventions),
        "pivot_used": any(x["pivot"] for x in interventions),
        **({} if judge_calls is None else {"judge_calls": list(judge_calls)}),
    }

INTERVENTION_KEY = "harm_intervention"  # per-token: None, or the intervention at that position
JUDGE_KEY = "harm_judge"  # per-token: None, or the self-judgment passes made for that position


def judge_calls_of(entries) -> list[dict]:
    return [record for e in (entries or []) if e for record in e]


def interventions_of(entries) -> list[dict]:
    return [e for e in (entries or []) if e]


# What a client sees of the trace (--safety-trace-detail; the operator key always sees "full"):
#   full: everything above;
#   scores: per-token scores, interventions without the withheld token ids;
#   decisions: no score of any kind (per-token scores, prompt_score and max_score would
#     make a score oracle) and no withheld token: the summary's decision fields and, per
#     intervention, its position, whether it was the pivot (else a re-draw) and why the
#     plugin ended the request there, if it did.
# Whitelists, so a field added later stays hidden until it is placed here on purpose.
DECISION_FIELDS = ("mode", "threshold", "window", "first_over_threshold", "num_over_threshold",
                   "num_scored", "num_vetoes", "pivot_used", "interventions", "judge_calls")
DECISION_INTERVENTION_FIELDS = ("position", "pivot", "stop")  # stop: why the plugin ended the request
DECISION_JUDGE_FIELDS = ("position", "tokens", "effect")  # no P(yes), no probe score: no oracle


def redact_judge_records(records: list[dict] | None, detail: str) -> list[dict] | None:
    if records is None or detail != "decisions":
        return records
    return [{k: r[k] for k in DECISION_JUDGE_FIELDS if k in r} for r in records]


def redact_intervention(entry: dict | None, detail: str) -> dict | None:
    if entry is None or detail == "full":
        return entry
    if detail == "scores":
        vetoed = [{k: v for k, v in x.items() if k != "token"} for x in entry.get("vetoed", [])]
        return {**entry, "vetoed": vetoed}
    return {k: entry[k] for k in DECISION_INTERVENTION_FIELDS if k in entry}


def redact_summary(summary: dict, detail: str) -> dict:
    if detail == "full":
        return summary
    out = summary if detail == "scores" else {k: summary[k] for k in DECISION_FIELDS if k in summary}
    interventions = [redact_intervention(x, detail) for x in summary.get("interventions", [])]
    if "judge_calls" in out:
        out = {**out, "judge_calls": redact_judge_records(out["judge_calls"], detail)}
    return {**out, "interventions": interventions}

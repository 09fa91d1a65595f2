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
              interventions: Sequence[dict] = (), window: int = 1) -> dict:
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
    }

INTERVENTION_KEY = "harm_intervention"  # per-token: None, or the intervention at that position


def interventions_of(entries) -> list[dict]:
    return [e for e in (entries or []) if e]

"""Per-request harm trace: the summary a client sees beside its answer."""
from __future__ import annotations

from typing import Sequence

TRACE_KEY = "harm_score"  # per-token key in SGLang's customized_info / meta_info
SUMMARY_KEY = "tokenwise_safety"  # summary field in meta_info and OpenAI responses


def summarize(scores: Sequence[float | None], threshold: float, mode: str,
              interventions: Sequence[dict] = ()) -> dict:
    """scores[0] judges the prompt (state after its last token); scores[i], i >= 1, judges
    output token i-1. The last output token's state is never computed (no forward follows
    it), so len(scores) == number of output tokens."""
    valid = [(i, s) for i, s in enumerate(scores) if s is not None]
    over = [i for i, s in valid if s >= threshold]
    return {
        "mode": mode,
        "threshold": threshold,
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

"""Token commit with verification ("correct, don't reject"): per-request state and the
batched re-draw. No SGLang import: the seams in patches/enforce.py drive it.

A sampled token stays *pending* until the next forward pass has produced, and the probe
scored, its own hidden state. A pending token judged harmful (its score and the scores
of the window-1 committed positions before it all at or over the request's threshold;
the window rule itself runs batched in patches/enforce.ParentTable) is vetoed: it is removed and its position re-drawn from the parent distribution (the
logits that produced it, kept as their top-k) with every vetoed candidate masked. When
no top-k candidate is left, or a position has been vetoed more than `max_vetoes` times,
the request is steered into the safe pivot: a fixed token sequence forced one token per
step, which the model then continues. A prompt scored over threshold starts the answer
with the pivot.
"""
from __future__ import annotations

import dataclasses

import torch

from .self_judge import JudgeState


@dataclasses.dataclass
class Intervention:
    position: int  # index in the output
    vetoed: list[dict]  # [{"token": id, "score": p}, ...] in veto order
    replacement: int | None = None
    pivot: bool = False
    stop: str | None = None  # the plugin ended the request here: "grammar", "second_pivot", "error"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class RequestPolicy:
    enforce: bool
    threshold: float
    origin: str = "operator"  # "client": the request tightened the operator's policy


class RequestState:
    """One per request, like a grammar matcher. Mutated only by the enforce seam."""

    def __init__(self, policy: RequestPolicy, pivot_ids: list[int] = ()):
        self.policy = policy
        self.pivot_ids = list(pivot_ids)
        self.pivot_queue: list[int] = []  # pivot tokens still to force
        self.pending_forced = False  # the pending token is a pivot token: never vetoed
        self.open: Intervention | None = None  # interventions at the pending position
        self.interventions: list[Intervention] = []
        self.deferred_finish = None  # (reason, finished_len) held until the last token is scored
        self.release_finish = False
        self.vetoed_now = False  # this step rolled the pending token back
        self.pivots = 0
        self.stop: Intervention | None = None  # set: the request ends at this step
        self.resample_token: int | None = None  # popped at a retraction, forced again at re-prefill
        self.saved_history = None  # window history kept across a retraction (new slot)
        self.judge = JudgeState()  # self-judgment: the standing verdict, records for the trace

    def start_pivot(self, position: int, vetoed: list[dict], pivot_ids: list[int] | None = None) -> int:
        """Begin forcing the pivot at `position`; returns the token to emit now. The
        record stays open until that token's own state has been scored."""
        ids = pivot_ids or self.pivot_ids
        self.open = Intervention(position, vetoed, ids[0], pivot=True)
        self.pivot_queue = list(ids[1:])
        self.pending_forced = True
        self.pivots += 1
        return ids[0]

    def end_here(self, position: int, vetoed: list[dict], reason: str) -> None:
        """End the request at `position` (nothing from there on is emitted)."""
        self.open = None
        self.pivot_queue, self.pending_forced = [], False
        self.stop = Intervention(position, vetoed, stop=reason)
        self.interventions.append(self.stop)

    def commit_open(self) -> dict | None:
        """The pending position is final: file its open intervention, if any, and return
        it as the trace entry for that position."""
        if self.open is None:
            return None
        record, self.open = self.open, None
        self.interventions.append(record)
        return record.as_dict()

    def next_forced(self) -> int | None:
        """Pop the next pivot token to force (None when the pivot is done)."""
        if not self.pivot_queue:
            self.pending_forced = False
            return None
        self.pending_forced = True
        return self.pivot_queue.pop(0)


def redraw(cand_logits: torch.Tensor, cand_ids: torch.Tensor, vetoed: torch.Tensor,
           temperature: torch.Tensor, top_p: torch.Tensor, top_k: torch.Tensor,
           greedy: torch.Tensor, generator: torch.Generator | None = None):
    """Re-draw one token per row from its parent's top-k candidates, vetoed ones masked.

    cand_logits, cand_ids: [n, K] (descending logits; -inf where SGLang already forbade
    the token, e.g. a grammar mask); vetoed: [n, K] bool; temperature, top_p: [n] float;
    top_k: [n] int (request's own top-k, <= 0: off); greedy: [n] bool. Returns (tokens [n],
    exhausted [n] bool): exhausted rows have no allowed candidate left (vetoed, forbidden
    or outside the request's top-k) and their token is meaningless.
    """
    n, k = cand_logits.shape
    rank = torch.arange(k, device=cand_logits.device).expand(n, k)
    allowed = ~vetoed & torch.isfinite(cand_logits) & ((top_k[:, None] <= 0) | (rank < top_k[:, None]))
    exhausted = ~allowed.any(dim=1)
    # greedy: the best remaining candidate (candidates are sorted, so the first allowed)
    pick = torch.argmax(allowed.int(), dim=1)
    sampled = ~greedy & ~exhausted
    if bool(sampled.any()):  # one host sync, and only when a sampled row was vetoed
        rows = sampled.nonzero().flatten()
        logits = cand_logits[rows].float().masked_fill(~allowed[rows], float("-inf"))
        # temperature, then the request's top-p over the remaining mass
        probs = torch.softmax(logits / temperature[rows].clamp_min(1e-5)[:, None], dim=1)
        cum = torch.cumsum(probs, dim=1) - probs
        probs = probs.masked_fill(cum > top_p[rows, None], 0.0)
        pick[rows] = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return cand_ids.gather(1, pick[:, None]).squeeze(1), exhausted

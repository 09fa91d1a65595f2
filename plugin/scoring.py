"""Per-step batched scoring: hidden states of the whole batch -> harm scores, one matvec."""
from __future__ import annotations

import math
import time
from typing import Callable, Sequence

import torch

from tokenwise_safety.probe import HarmProbe


class HostScores(Sequence):
    """Scores of one step, indexable per request as Python floats.

    On CUDA the device->host copy is started non-blocking into pinned memory and read
    lazily: SGLang reads customized_info only after waiting on the step's copy_done
    event, which is recorded after this copy on the same stream, so the values are
    complete by then and the forward never syncs for them.
    """

    def __init__(self, scores: torch.Tensor, ok: torch.Tensor | None = None,
                 on_ready: Callable[[list[float]], None] | None = None):
        self._on_ready = on_ready
        self._list = None
        if ok is not None:  # failed rows (--safety-on-error) read as None: unscored
            scores = torch.where(ok.to(scores.device), scores, torch.full_like(scores, float("nan")))
        if scores.device.type == "cpu":
            self._host = scores
        else:
            self._host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
            self._host.copy_(scores, non_blocking=True)

    def _values(self) -> list[float | None]:
        if self._list is None:
            values = self._host.tolist()
            self._list = [v if math.isfinite(v) else None for v in values]
            if self._on_ready is not None:
                self._on_ready([v for v in self._list if v is not None])
        return self._list

    def __getitem__(self, i):
        return self._values()[i]

    def __len__(self) -> int:
        return self._host.shape[0]


def last_positions(hidden: torch.Tensor, extend_lens: Sequence[int] | None) -> torch.Tensor:
    """Rows of `hidden` that are each request's last position.

    hidden holds one row per request (capture mode LAST, or decode) or, in FULL mode
    during prefill, one row per extended token; extend_lens then says how many.
    """
    if extend_lens is None or hidden.shape[0] == len(extend_lens):
        return hidden
    lens = torch.as_tensor(list(extend_lens), device=hidden.device)
    return hidden[torch.cumsum(lens, 0) - 1]


class StepScorer:
    """Shared across requests: scores each forward pass's batch with the harm probe."""

    def __init__(self, probe: HarmProbe):
        self.probe = probe

    def score_step(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None):
        """hidden [N, H] (state of each request's newest position) and the token ids at
        those positions -> (scores [N] float32 on hidden's device, host seconds)."""
        start = time.perf_counter()
        scores = self.probe.score(hidden)
        return scores, time.perf_counter() - start


class TokenIdScorer(StepScorer):
    """Scores 1.0 exactly where the scored position holds one of `ids`, else 0.0: makes
    the commit mechanism testable token by token (`--safety-scorer token-ids:5,9`).
    For fault tests it can also score NaN at `nan` ids and raise when a batch holds a
    `raise` id (`token-ids:5,9+nan:7+raise:8`)."""

    def __init__(self, ids: list[int], nan: list[int] = (), fail: list[int] = ()):
        self.ids, self.nan, self.fail = torch.tensor(ids), torch.tensor(list(nan)), torch.tensor(list(fail))

    def score_step(self, hidden, input_ids=None):
        start = time.perf_counter()
        if input_ids is None:
            raise ValueError("token-ids scorer needs the batch's input ids")
        scores = torch.isin(input_ids, self.ids.to(input_ids.device)).float()
        if len(self.fail) and bool(torch.isin(input_ids, self.fail.to(input_ids.device)).any()):
            raise RuntimeError("injected scorer fault (token-ids ...+raise:...)")
        if len(self.nan):
            scores[torch.isin(input_ids, self.nan.to(input_ids.device))] = float("nan")
        return scores, time.perf_counter() - start


def parse_token_ids(spec: str) -> dict[str, list[int]]:
    """'token-ids:5,9+nan:7+raise:8' -> {"ids": [5, 9], "nan": [7], "fail": [8]}; ValueError
    with a one-line message on anything else."""
    parts = {"ids": [], "nan": [], "fail": []}
    for i, part in enumerate(spec.split("+")):
        name, _, ids = part.partition(":")
        key = {"token-ids": "ids", "nan": "nan", "raise": "fail"}.get(name)
        if key is None or (i == 0) != (key == "ids"):
            raise ValueError(f"--safety-scorer {spec!r}: use 'token-ids:ID,...' optionally followed by "
                             "'+nan:ID,...' and '+raise:ID,...'")
        try:
            parts[key] = [int(x) for x in ids.split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"--safety-scorer {spec!r}: token ids must be integers") from None
    return parts


def make_scorer(spec: str, probe: HarmProbe) -> StepScorer:
    if spec.startswith("token-ids:"):
        return TokenIdScorer(**parse_token_ids(spec))
    return StepScorer(probe)

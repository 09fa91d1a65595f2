"""Seam: the draft model's tree drafting (EagleDraftWorker.draft_forward), for
harmless-first drafting (--safety-draft-probe, STANDALONE with --speculative-eagle-topk >= 2).

The target vetoes a harmful draft at verify (patches/spec_verify.py) and everything drafted
below it is lost with it. Here the draft model gets its own probe. Each draft step feeds the
tree's current nodes to the draft model; that forward gives each fed node's hidden state,
which the draft probe scores. A node it judges harmful (for an enforced request) keeps its
place in the tree, so the target still scores and vetoes it, but its children's draft
probabilities are scaled down: the tree's budget goes to its harmless siblings, which is
where the target's re-draw continues (the vetoed child's logit is -inf in its parent's row).
Verification is unchanged and exact: this only changes what is proposed.

A chain (topk 1) cannot gain from this: the harmful token must stay in the tree for the
target to veto it, and a chain has no sibling to continue from (replacing it instead makes
the target reject the replacement and re-draw a step later; measured, README).

Hooks (HOOKS, installed by patches/layer_capture.py when a speculative model loads): AROUND `draft`
remembers the batch's requests (draft_forward sees only tensors); AROUND `draft_forward`
marks the loop and asks the draft model for its final hidden state;
AFTER the draft ModelRunner.forward keeps that step's logits output; AROUND
`renorm_draft_probs` (the step's child probabilities, before SGLang's top-k) scales the
rows of flagged nodes. The last draft level is never fed to the draft model and is left to
the verify veto.
"""
from __future__ import annotations

import logging

import torch

from tokenwise_safety import metrics
from tokenwise_safety.probe import HarmProbe
from tokenwise_safety.scoring import make_scorer

from . import worker_scoring
from .enforce import state_of
from .server_args import ATTR

_WORKER = "sglang.srt.speculative.eagle_worker_v2"
DRAFT = f"{_WORKER}.EagleDraftWorker.draft"
DRAFT_FORWARD = f"{_WORKER}.EagleDraftWorker.draft_forward"
RENORM = f"{_WORKER}.renorm_draft_probs"
RUNNER_FORWARD = "sglang.srt.model_executor.model_runner.ModelRunner.forward"
RANK_DOWN = 1e-6  # a flagged node's children's probabilities are scaled by this
logger = logging.getLogger(__name__)


class _Loop:
    """The draft loop in progress in this process (one scheduler thread drives it)."""
    worker = None
    enforced_rows: torch.Tensor | None = None  # [bs * topk] bool
    out = None  # the last draft forward's logits output
    fed: torch.Tensor | None = None  # and the node tokens it fed


def _config(worker) -> dict | None:
    """The draft probe's settings with its scorer, built once (None: harmless-first off)."""
    if not hasattr(worker, "_tokenwise_draft"):
        config = getattr(worker.server_args, ATTR, None)
        draft = (config or {}).get("draft")
        if draft is not None:
            draft = dict(draft, scorer_obj=make_scorer(config["scorer"], HarmProbe.load(draft["probe_path"])))
        worker._tokenwise_draft = draft
    return worker._tokenwise_draft


def around_draft(original, worker, batch, *args, **kwargs):
    worker._tokenwise_reqs = list(getattr(batch, "reqs", None) or [])
    try:
        return original(worker, batch, *args, **kwargs)
    finally:
        worker._tokenwise_reqs = []


def around_draft_forward(original, worker, forward_batch, *args, **kwargs):
    enforced = _enforced(worker, forward_batch)
    if enforced is None:
        return original(worker, forward_batch, *args, **kwargs)
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

    if -1 in worker._tokenwise_draft["layers"] and not forward_batch.capture_hidden_mode.need_capture():
        forward_batch.capture_hidden_mode = CaptureHiddenMode.LAST  # one row per fed node
    _Loop.worker, _Loop.enforced_rows, _Loop.out = worker, enforced.repeat_interleave(worker.topk), None
    try:
        return original(worker, forward_batch, *args, **kwargs)
    finally:
        _Loop.worker, _Loop.enforced_rows, _Loop.out, _Loop.fed = None, None, None, None


def _enforced(worker, fb) -> torch.Tensor | None:
    """Per request, whether its policy enforces; None when there is nothing to rank (probe
    off, a chain, no enforced request, a batch this module cannot map to requests)."""
    if _config(worker) is None or worker.topk < 2 or fb.forward_mode.is_idle():
        return None
    reqs = getattr(worker, "_tokenwise_reqs", [])
    if len(reqs) != fb.batch_size or worker.hot_token_id is not None:
        return None
    enforced = torch.tensor([bool((st := state_of(r)) is not None and st.policy.enforce) for r in reqs])
    return enforced if enforced.any() else None


def after_runner_forward(result, runner, *args, **kwargs):
    if _Loop.worker is not None and runner is _Loop.worker.draft_runner:
        fb = args[0] if args else kwargs.get("forward_batch")
        _Loop.out, _Loop.fed = getattr(result, "logits_output", None), fb.input_ids
    return result


def around_renorm(original, next_token_logits, *args, **kwargs):
    probs = original(next_token_logits, *args, **kwargs)
    worker, rows = _Loop.worker, _Loop.enforced_rows
    if worker is None or _Loop.out is None or probs.shape[0] != len(rows) or len(_Loop.fed) != len(rows):
        return probs
    draft = worker._tokenwise_draft
    bad = rows & (_scores(worker, _Loop.out, draft, _Loop.fed) >= draft["threshold"])
    if bad.any():
        probs[bad.to(probs.device)] *= RANK_DOWN
        metrics.count_draft_reranks(int(bad.sum()))
    return probs


def _scores(worker, out, draft: dict, fed: torch.Tensor) -> torch.Tensor:
    """The draft probe's P(harmful) of each fed node (own score: the tree's paths are not
    followed here); a failure scores 0 (the verify veto still guards every token)."""
    n = len(fed)
    try:
        hidden = worker_scoring.all_rows(worker.draft_worker, out, draft["layers"], n)
        if hidden is None:
            raise RuntimeError("the draft model kept no hidden state for this step")
        scores, _ = draft["scorer_obj"].score_step(hidden, fed)
        return torch.nan_to_num(scores.float().cpu(), nan=0.0, posinf=0.0, neginf=0.0)
    except Exception:
        logger.exception("tokenwise safety: the draft probe failed for this step; drafts go unranked")
        return torch.zeros(n)


HOOKS = ((DRAFT, around_draft, "AROUND"), (DRAFT_FORWARD, around_draft_forward, "AROUND"),
         (RUNNER_FORWARD, after_runner_forward, "AFTER"), (RENORM, around_renorm, "AROUND"))

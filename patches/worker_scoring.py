"""Seam: the model worker's forward. Scores every request's newest position each step.

AFTER hook on TpModelWorker.forward_batch_generation: it runs once per forward, with or
without CUDA graphs (code inside the captured model forward would not re-run on replay).
The final-layer hidden states SGLang keeps in capture mode LAST are scored for the whole
batch in one matvec and attached as customized_info, which SGLang appends per request
and returns in meta_info["harm_score"] (one value per output token).
"""
from __future__ import annotations

import logging

from tokenwise_safety import metrics
from tokenwise_safety.probe import HarmProbe
from tokenwise_safety.scoring import HostScores, StepScorer, last_positions
from tokenwise_safety.trace import TRACE_KEY

from .server_args import ATTR

TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"
logger = logging.getLogger(__name__)


def _scorer(worker) -> StepScorer | None:
    """The worker's scorer, built once from the launch config (None: plugin off)."""
    if not hasattr(worker, "_tokenwise_scorer"):
        config = getattr(worker.server_args, ATTR, None)
        scorer = None
        if config is not None:
            probe = HarmProbe.load(config["probe_path"])
            scorer = StepScorer(probe, config["threshold"], config["mode"])
            logger.info("tokenwise safety: %s mode, probe %s, threshold %.3f",
                        config["mode"], config["probe_path"], config["threshold"])
        worker._tokenwise_scorer = scorer
    return worker._tokenwise_scorer


def after_forward(result, worker, batch=None, *args, **kwargs):
    # Speculative verify and forward-batch-only calls are not scored here yet.
    if batch is None or kwargs.get("is_verify") or (args[2:3] and args[2]):
        return result
    scorer = _scorer(worker)
    logits_output = getattr(result, "logits_output", None)
    if scorer is None or logits_output is None or logits_output.hidden_states is None:
        return result
    extend_lens = batch.extend_lens if batch.forward_mode.is_extend() else None
    hidden = last_positions(logits_output.hidden_states, extend_lens)
    scores, seconds = scorer.score_step(hidden)
    metrics.observe_probe_seconds(seconds)
    info = logits_output.customized_info or {}
    info[TRACE_KEY] = HostScores(scores, on_ready=metrics.observe_scores)
    logits_output.customized_info = info
    return result

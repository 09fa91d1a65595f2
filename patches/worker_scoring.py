"""Seam: the model worker's forward. Scores every request's newest position each step.

AFTER hook on TpModelWorker.forward_batch_generation: it runs once per forward, with or
without CUDA graphs (code inside the captured model forward would not re-run on replay).
The probe's features (the final-layer hidden state SGLang keeps in capture mode LAST,
beside the residual streams patches/layer_capture.py taps) are scored for the whole
batch in one matvec and attached as customized_info, which SGLang appends per request
and returns in meta_info["harm_score"] (one value per output token). Enforced requests
then go through the commit step (patches/enforce.py). A BEFORE hook arms the capture of
the parent distribution when the batch holds an enforced request. A step whose scoring
fails (an exception, no hidden state, a NaN or inf score) never takes the scheduler down:
its rows go to --safety-on-error (patches/enforce.py ends them or lets them run unscored).
"""
from __future__ import annotations

import logging

import torch

from tokenwise_safety import metrics
from tokenwise_safety.probe import HarmProbe
from tokenwise_safety.scoring import HostScores, last_positions, make_scorer
from tokenwise_safety.trace import TRACE_KEY

from . import enforce, layer_capture
from .server_args import ATTR

TARGET = "sglang.srt.managers.tp_worker.TpModelWorker.forward_batch_generation"
logger = logging.getLogger(__name__)


def _config(worker) -> dict | None:
    """The launch config, with the scorer built once per worker (None: plugin off)."""
    if not hasattr(worker, "_tokenwise"):
        # A speculative draft model's forwards are not scored: its tokens are drafts,
        # scored by the target at verify (patches/spec_verify.py).
        config = None if getattr(worker, "is_draft_worker", False) else getattr(worker.server_args, ATTR, None)
        if config is not None:
            config = dict(config, scorer_obj=make_scorer(config["scorer"], HarmProbe.load(config["probe_path"])))
            logger.info("tokenwise safety: %s mode, probe %s, threshold %.3f, scorer %s",
                        config["mode"], config["probe_path"], config["threshold"], config["scorer"])
        worker._tokenwise = config
    return worker._tokenwise


def _scorable(batch, kwargs, args) -> bool:
    # Speculative verify and forward-batch-only calls are not scored here yet.
    return batch is not None and not kwargs.get("is_verify") and not (args[2:3] and args[2])


def before_forward(worker, batch=None, *args, **kwargs):
    """Arm the parent-distribution capture for this step if a request may be vetoed, and
    keep the final hidden state where a speculative worker asked for none (STANDALONE's
    target prefill passes capture_hidden_mode=NULL)."""
    config = _config(worker)
    if config is None or not _scorable(batch, kwargs, args):
        return None
    states = enforce.states_of(worker, batch, config)
    armed = config["enforce_possible"] and any(st.policy.enforce for st in states)
    enforce.arm(config["top_k"] if armed else 0)
    mode = kwargs.get("capture_hidden_mode")
    if -1 in config["layers"] and mode is not None and not mode.need_capture():
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

        return (worker, batch, *args), {**kwargs, "capture_hidden_mode": CaptureHiddenMode.LAST}
    return None


def after_forward(result, worker, batch=None, *args, **kwargs):
    config = _config(worker)
    logits_output = getattr(result, "logits_output", None)
    if config is None or not _scorable(batch, kwargs, args) or logits_output is None:
        return result
    scores, ok = _score(worker, batch, logits_output, config)
    info = logits_output.customized_info or {}
    info[TRACE_KEY] = HostScores(scores, ok, on_ready=metrics.observe_scores)
    try:
        enforce.apply(worker, batch, result, scores, ok, config, info)
    except Exception:  # a bug in the veto path must cost its requests, never the server
        logger.exception("tokenwise safety: enforcement failed for this step")
        _whole_step_failed(worker, batch, result, scores, config, info)
    logits_output.customized_info = info
    return result


def _whole_step_failed(worker, batch, result, scores, config, info) -> None:
    """Every row of the step goes to --safety-on-error; the veto path is not re-entered."""
    enforce.arm(0)
    ok = torch.zeros(len(batch.reqs), dtype=torch.bool)
    info[TRACE_KEY] = HostScores(scores, ok, on_ready=metrics.observe_scores)
    try:
        enforce.apply(worker, batch, result, scores, ok, config, info)
    except Exception:
        logger.exception("tokenwise safety: could not apply --safety-on-error for this step")
        enforce.arm(0)


def _score(worker, batch, logits_output, config) -> tuple[torch.Tensor, torch.Tensor]:
    """Each request's newest position, scored (see guarded_scores)."""
    def inputs():
        extend_lens = batch.extend_lens if batch.forward_mode.is_extend() else None
        hidden = features(worker, batch, logits_output, config["layers"], extend_lens)
        input_ids = None
        if batch.input_ids is not None:
            input_ids = last_positions(batch.input_ids[:, None], extend_lens)[:, 0]
        return hidden, input_ids
    return guarded_scores(config, len(batch.reqs), f"a batch of {len(batch.reqs)} request(s)", inputs)


def guarded_scores(config, n: int, what: str, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [n], ok [n] bool) of the rows inputs() -> (hidden or None, token ids) gives:
    a row is not ok when scoring raised, found no hidden state, or gave NaN/inf (its score
    is then 0.0, and --safety-on-error decides)."""
    try:
        hidden, input_ids = inputs()
        if hidden is None:
            raise RuntimeError("SGLang kept no hidden state for this forward")
        scores, seconds = config["scorer_obj"].score_step(hidden, input_ids)
        metrics.observe_probe_seconds(seconds)
    except Exception:
        logger.exception("tokenwise safety: scoring failed for %s", what)
        return torch.zeros(n), torch.zeros(n, dtype=torch.bool)
    ok = torch.isfinite(scores)
    return torch.where(ok, scores, torch.zeros_like(scores)), ok


def features(worker, batch, logits_output, layers, extend_lens):
    """Each request's newest position, the probe's layers concatenated: [N, F] (None when
    SGLang kept no final hidden state for this forward)."""
    tokens = sum(extend_lens) if extend_lens is not None else len(batch.reqs)
    parts = _layer_rows(worker, logits_output, layers, tokens)
    if parts is None:
        return None
    if not parts:  # a scorer that reads no hidden state (token ids)
        return torch.zeros(len(batch.reqs), 0)
    parts = [last_positions(rows, extend_lens) for rows in parts]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def all_rows(worker, logits_output, layers, tokens: int):
    """Every position of the last forward (capture mode FULL), the probe's layers
    concatenated: [tokens, F] (None when SGLang kept no final hidden state)."""
    parts = _layer_rows(worker, logits_output, layers, tokens)
    if parts is None:
        return None
    if not parts:
        return torch.zeros(tokens, 0)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)


def _layer_rows(worker, logits_output, layers, tokens: int) -> list[torch.Tensor] | None:
    """Per probe layer, the rows of the last forward: a tapped layer has one per token;
    the final layer has what SGLang kept (one per request in mode LAST, all in FULL)."""
    taps = layer_capture.taps_of(worker.model_runner)
    parts = []
    for index in layers:
        if index in taps:
            parts.append(taps[index].rows_of(tokens))
        elif logits_output.hidden_states is not None:
            parts.append(logits_output.hidden_states)
        else:
            return None
    return parts

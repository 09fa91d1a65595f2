"""Seam: the sampler. Keeps each step's top-k logits, the parent distribution of the
tokens sampled now, before temperature and sampling touch them (only when the step was
armed: a request in the batch is enforced)."""
from __future__ import annotations

import torch

from .enforce import _Step

SAMPLER_PREPROCESS = "sglang.srt.layers.sampler.Sampler._preprocess_logits"


def after_sampler_preprocess(logits, sampler, *args, **kwargs):
    if _Step.capture_k:
        vals, ids = torch.topk(logits, min(_Step.capture_k, logits.shape[-1]), dim=-1)
        _Step.topk = (vals.float(), ids)
        _Step.capture_k = 0
    return logits

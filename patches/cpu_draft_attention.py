"""Seam: the draft model's attention backends, for EAGLE-v2-style drafting on torch_native.

SGLang's CPU engine without AMX serves with the torch_native backend, for which
DraftBackendFactory (sglang/srt/speculative/draft_utils.py) has no entry, so
--speculative-algorithm STANDALONE (and EAGLE) stops at startup: "EAGLE is not supported
in decode attention backend torch_native". These hooks give the factory what the AMX path
has (intel_amx_backend.IntelAMXMultiStepDraftBackend / IntelAMXAttnBackend), in torch_native
maths, and hand every other backend to SGLang's own code:

* draft decode (create_decode_backend): one torch_native backend per draft step but the
  last. Step i runs the batch's topk tokens per request at positions seq_lens + i, writes
  them to the slots SGLang reserved right after the prefix (out_cache_loc[i]) and lets each
  see the committed prefix plus its own branch's draft tokens 0..i: with topk == 1 that is
  req_to_token[r, :seq_lens + i + 1], plain decode over a longer row; with topk > 1, row
  (b, t) reads prefix ++ req_to_token[r, seq_lens + t * num_steps + 0..i], as SGLang's
  Triton generate_draft_decode_kv_indices does (page_size 1 only).
* draft extend (create_draft_extend_backend): a plain TorchNativeAttnBackend. Its extend
  path already handles DRAFT_EXTEND_V2 (the batch carries extend_prefix_lens = seq_lens,
  extend_seq_lens = num_draft_tokens, seq_lens = prefix + num_draft_tokens: causal over
  the prefix and the verified window) and the prefill-time draft extend (plain EXTEND);
  cpu_verify_attention, which hooks the same forward_extend, only takes TARGET_VERIFY.

Like cpu_verify_attention it is active without --safety-plugin: it only fills a path that
would otherwise fail. Eager only: SGLang captures no draft graphs on a CPU.
"""
from __future__ import annotations

import functools

import torch

CREATE_DECODE_BACKEND = "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_decode_backend"
CREATE_DRAFT_EXTEND_BACKEND = (
    "sglang.srt.speculative.draft_utils.DraftBackendFactory.create_draft_extend_backend")
BACKEND = "torch_native"


def _configured_backend(factory, decode: bool) -> str:
    """The backend name DraftBackendFactory._create_backend would look up."""
    from sglang.srt.speculative import draft_utils

    prefill_backend, decode_backend = draft_utils.attention_backends()
    return factory.draft_attn_backend or (decode_backend if decode else prefill_backend)


def _stamp(backend) -> None:
    backend.prefill_attention_backend_str = BACKEND
    backend.decode_attention_backend_str = BACKEND


def around_create_decode_backend(original, factory, *args, **kwargs):
    if (factory.speculative_num_steps <= 1 or factory.qsa_profile is not None
            or _configured_backend(factory, decode=True) != BACKEND):
        return original(factory, *args, **kwargs)
    from sglang.srt.layers.attention.attention_registry import attn_backend_wrapper_for_draft_decode
    from sglang.srt.speculative.draft_utils import _assert_draft_needs_no_conv_sidecar

    _assert_draft_needs_no_conv_sidecar(factory.draft_model_runner)
    backend = TorchNativeMultiStepDraftBackend(
        factory.draft_model_runner, factory.topk, factory.speculative_num_steps)
    backend = attn_backend_wrapper_for_draft_decode(factory.draft_model_runner, backend)
    _stamp(backend)
    for child in backend.attn_backends:
        _stamp(child)
    return backend


def around_create_draft_extend_backend(original, factory, *args, **kwargs):
    from sglang.srt.speculative import draft_utils

    decode_mode = draft_utils.get_spec().speculative_attention_mode == "decode"
    if factory.qsa_profile is not None or _configured_backend(factory, decode=decode_mode) != BACKEND:
        return original(factory, *args, **kwargs)
    from sglang.srt.layers.attention.attention_registry import attn_backend_wrapper_for_draft_extend
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend

    backend = TorchNativeAttnBackend(factory.draft_model_runner)
    _stamp(backend)
    wrapped = attn_backend_wrapper_for_draft_extend(factory.draft_model_runner, backend)
    if wrapped is not backend and wrapped is not None:
        _stamp(wrapped)
    return wrapped


def draft_decode_table(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                       seq_lens: torch.Tensor, topk: int, num_steps: int) -> torch.Tensor:
    """[bs * topk, max(seq_lens) + num_steps]: row b * topk + t is request b's prefix
    req_to_token[r, :seq_len] followed by branch t's draft slots
    req_to_token[r, seq_len + t * num_steps + s], s < num_steps (page_size 1). Entries past
    a row's seq_len + num_steps are never read (clamped in-bounds filler)."""
    bs = seq_lens.numel()
    seq = seq_lens.to(torch.int64).repeat_interleave(topk)[:, None]
    branch = torch.arange(topk, device=seq.device).repeat(bs)[:, None]
    cols = torch.arange(int(seq_lens.max()) + num_steps, device=seq.device)[None, :]
    src = torch.where(cols < seq, cols, cols + branch * num_steps).clamp(max=req_to_token.shape[1] - 1)
    rows = req_pool_indices.to(torch.int64).repeat_interleave(topk)[:, None]
    return req_to_token[rows, src]


@functools.cache
def _step_backend_class():
    from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    class TorchNativeDraftStepBackend(TorchNativeAttnBackend):
        """One draft decode step: torch_native decode over the rows, lengths and SWA write
        locations its multi-step owner planned for the step (draft_decode_metadata)."""

        def __init__(self, model_runner, step: int):
            super().__init__(model_runner)
            self.step = step
            # (req_to_token table, its row per query, kv length per query, swa write loc)
            self.draft_decode_metadata = None

        def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, **kwargs):
            if self.draft_decode_metadata is None:
                raise RuntimeError(
                    "torch_native draft decode step ran without metadata: "
                    "TorchNativeMultiStepDraftBackend.init_forward_metadata was not called")
            if layer.is_cross_attention:
                raise NotImplementedError("torch_native draft decode: cross-attention layers")
            table, rows, kv_lens, swa_loc = self.draft_decode_metadata
            q = q.reshape(-1, layer.tp_q_head_num * layer.qk_head_dim)
            if q.shape[0] != kv_lens.shape[0]:
                raise RuntimeError(
                    f"torch_native draft decode step {self.step}: {q.shape[0]} query rows "
                    f"for {kv_lens.shape[0]} planned draft rows")
            o = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
            if save_kv_cache and k is not None and v is not None:
                self.token_to_kv_pool.set_kv_buffer(
                    layer, KVWriteLoc(forward_batch.out_cache_loc, swa_loc), k, v)
            window = layer.sliding_window_size
            self._run_sdpa_forward_decode(
                q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
                o.view(-1, layer.tp_q_head_num, layer.v_head_dim),
                self.token_to_kv_pool.get_key_buffer(layer.layer_id),
                self.token_to_kv_pool.get_value_buffer(layer.layer_id),
                table, rows, kv_lens, None,
                scaling=layer.scaling,
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
                causal=False,
                is_cross_attn=False,
                sliding_window_size=window if window is not None and window > -1 else None,
            )
            return o

    return TorchNativeDraftStepBackend


class TorchNativeMultiStepDraftBackend:
    """Wraps one torch_native backend per draft decode step (speculative_num_steps - 1 of
    them: the last step only samples) and plans all steps at once, like
    IntelAMXMultiStepDraftBackend. Not an AttentionBackend itself: EagleDraftWorker calls
    init_forward_metadata on it and runs step i under attn_backends[i]."""

    def __init__(self, model_runner, topk: int, speculative_num_steps: int):
        page_size = getattr(model_runner, "page_size", 1) or 1
        if topk > 1 and page_size > 1:
            raise NotImplementedError(
                "torch_native draft decode supports --speculative-eagle-topk > 1 only with "
                f"--page-size 1 (got page size {page_size}); use --speculative-eagle-topk 1")
        self.topk = topk
        self.speculative_num_steps = speculative_num_steps
        self.device = model_runner.device
        step_cls = _step_backend_class()
        self.attn_backends = [step_cls(model_runner, step) for step in range(speculative_num_steps - 1)]
        self.req_to_token_pool = model_runner.req_to_token_pool
        self.token_to_kv_pool = model_runner.token_to_kv_pool

    def init_forward_metadata(self, forward_batch) -> None:
        from sglang.srt.speculative.eagle_utils import per_step_draft_out_cache_loc

        bs, topk, num_steps = forward_batch.batch_size, self.topk, self.speculative_num_steps
        req_to_token = self.req_to_token_pool.req_to_token
        seq_lens = forward_batch.seq_lens.to(torch.int64)
        if topk == 1:
            table, rows, base = req_to_token, forward_batch.req_pool_indices, seq_lens
        else:
            table = draft_decode_table(req_to_token, forward_batch.req_pool_indices, seq_lens,
                                       topk, num_steps)
            rows = torch.arange(bs * topk, dtype=torch.int64, device=seq_lens.device)
            base = seq_lens.repeat_interleave(topk)
        step_locs = None
        if self.attn_backends and self.attn_backends[0].use_sliding_window_kv_pool:
            step_locs = per_step_draft_out_cache_loc(forward_batch.out_cache_loc, bs, topk, num_steps)
        for step, backend in enumerate(self.attn_backends):
            swa_loc = (None if step_locs is None
                       else self.token_to_kv_pool.translate_loc_from_full_to_swa(step_locs[step]))
            # Step `step` sees the prefix and its own draft tokens 0..step.
            backend.draft_decode_metadata = (table, rows, base + step + 1, swa_loc)
            backend.swa_out_cache_loc = swa_loc

"""Seam: the torch_native attention backend's extend forward, in speculative verify.

SGLang's CPU engine without AMX serves with the torch_native backend, whose extend path
has no TARGET_VERIFY case: it reads extend_prefix_lens, which a verify batch does not
carry, and would attend causally where a draft tree needs its tree mask. So speculative
decoding (NGRAM, STANDALONE) cannot verify on such a CPU at all. This hook gives it the
verify attention the AMX backend has (intel_amx_backend._build_extend_metadata): each
request's D draft tokens see the whole committed prefix plus their ancestors in the
draft tree (spec_info.custom_mask; a chain when tree_topk == 1). Every other forward
goes to SGLang's own code. Unlike the plugin's other seams it is active without
--safety-plugin: it only fills a path that would otherwise fail.
"""
from __future__ import annotations

import torch
from torch.nn.functional import scaled_dot_product_attention

FORWARD_EXTEND = "sglang.srt.layers.attention.torch_native_backend.TorchNativeAttnBackend.forward_extend"


def around_forward_extend(original, backend, q, k, v, layer, forward_batch, save_kv_cache=True, *args, **kwargs):
    if not forward_batch.forward_mode.is_target_verify() or layer.is_cross_attention:
        return original(backend, q, k, v, layer, forward_batch, save_kv_cache, *args, **kwargs)
    from sglang.srt.mem_cache.memory_pool import KVWriteLoc

    if save_kv_cache and k is not None and v is not None:
        backend.token_to_kv_pool.set_kv_buffer(
            layer, KVWriteLoc(forward_batch.out_cache_loc, backend.swa_out_cache_loc), k, v)
    q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
    out = q.new_empty((q_.shape[0], layer.tp_q_head_num, layer.v_head_dim))
    spec = forward_batch.spec_info
    d = spec.draft_token_num
    k_cache = backend.token_to_kv_pool.get_key_buffer(layer.layer_id)
    v_cache = backend.token_to_kv_pool.get_value_buffer(layer.layer_id)
    prefix = forward_batch.seq_lens.tolist()
    masks = tree_masks(spec, prefix, d, q.device)
    rows = backend.req_to_token_pool.req_to_token
    for b, (n, pool_idx) in enumerate(zip(prefix, forward_batch.req_pool_indices.tolist())):
        slots = rows[pool_idx, : n + d]
        key = k_cache[slots].movedim(0, 1).to(q_.dtype)
        value = v_cache[slots].movedim(0, 1).to(q_.dtype)
        query = q_[b * d:(b + 1) * d].movedim(0, 1)
        out[b * d:(b + 1) * d] = scaled_dot_product_attention(
            query.unsqueeze(0), key.unsqueeze(0), value.unsqueeze(0), attn_mask=masks[b],
            scale=layer.scaling, enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
        ).squeeze(0).movedim(1, 0)
    return out.reshape(q.shape[0], -1)


def tree_masks(spec, prefix: list[int], d: int, device) -> list[torch.Tensor]:
    """Per request, the [D, prefix + D] bool mask: the whole prefix, then the draft tree
    (its custom mask, draft-only [B, D, D] or full per-request rows; causal for a chain)."""
    custom = getattr(spec, "custom_mask", None)
    chain = getattr(spec, "tree_topk", -1) == 1 or custom is None or custom.numel() == 0
    draft_only = not chain and custom.numel() == len(prefix) * d * d
    masks, start = [], 0
    for b, n in enumerate(prefix):
        if chain:
            tree = torch.ones(d, d, dtype=torch.bool, device=device).tril()
        elif draft_only:
            tree = custom.view(len(prefix), d, d)[b].to(device=device, dtype=torch.bool)
        else:  # FULL_MASK: each query row spans prefix + D
            width = n + d
            masks.append(custom[start:start + d * width].view(d, width).to(device=device, dtype=torch.bool))
            start += d * width
            continue
        masks.append(torch.cat([torch.ones(d, n, dtype=torch.bool, device=device), tree], dim=1))
    return masks

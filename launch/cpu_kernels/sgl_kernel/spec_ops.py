"""Pure-torch versions of the sgl_kernel CPU ops that SGLang's speculative decoding calls.

SGLang's CPU engine calls these (the `_is_cpu` branches of sglang.kernels.ops.speculative.*,
kernels/ops/kvcache/cache_move.py and srt/mem_cache/allocation.py) for NGRAM, STANDALONE
and EAGLE. Each function keeps the C++ kernel's name, argument order and in-place contract
(sgl-kernel/csrc/cpu/spec.cpp, kvcache.cpp): outputs are written through the tensors passed
in, -1 stays the "none" sentinel, and whatever the kernel does not write is left as it was,
because callers pre-fill some outputs (retrive_next_* with -1, the FULL_MASK prefix with True).

The kernels address every tensor as a flat row-major buffer, so these do too (`_flat`), and
refuse non-contiguous tensors as the C++ CHECK_INPUT does. They are dtype-agnostic (int32 or
int64 indices), run once per decode step on small tensors, and import nothing but torch so
that bench/spec_kernels_cuda.py can load this file by path next to the real CUDA sgl_kernel.
"""
from __future__ import annotations

import ctypes
from typing import Optional

import torch

__all__ = [
    "assign_draft_cache_locs_contiguous_cpu",
    "assign_extend_cache_locs_cpu",
    "assign_req_to_token_pool_cpu",
    "build_tree_kernel_efficient_cpu",
    "copy_all_layer_kv_cache_cpu",
    "fill_accept_out_cache_loc_cpu",
    "fill_bonus_tokens_cpu",
    "reconstruct_indices_from_tree_mask",
    "verify_tree_greedy_cpu",
]

FULL_MASK, QLEN_ONLY, QLEN_ONLY_BITPACKING = 0, 1, 2


def _flat(t: torch.Tensor, name: str) -> torch.Tensor:
    # A 1-D view sharing storage, so index assignment writes through to the caller's tensor.
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous: the kernel addresses it as a flat buffer")
    return t.view(-1)


def _ragged(start: torch.Tensor, end: torch.Tensor):
    """For each row r and j in [0, end[r] - start[r]): (r, start[r] + j, out_off[r] + j),
    where out_off is the exclusive prefix sum of (end - start), as the kernels compute it."""
    start = _flat(start, "start_offset").long()
    lens = _flat(end, "end_offset").long() - start
    out_off = torch.cumsum(lens, 0) - lens
    counts = lens.clamp(min=0)  # an empty or negative range writes nothing
    row = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), counts)
    j = torch.arange(row.numel(), device=lens.device) - (torch.cumsum(counts, 0) - counts)[row]
    return row, start[row] + j, out_off[row] + j


# ---- eagle.py -------------------------------------------------------------------------

def fill_bonus_tokens_cpu(accept_tokens: torch.Tensor, accept_lens: torch.Tensor,
                          bonus_tokens: torch.Tensor, accept_stride: int) -> None:
    """bonus_tokens[i] = accept_tokens_flat[accept_stride * i + accept_lens[i] - 1]:
    accept_lens counts the bonus token, so it is the last accepted slot of each row."""
    bs = accept_lens.numel()
    lens = _flat(accept_lens, "accept_lens").long()
    idx = torch.arange(bs, device=lens.device) * accept_stride + lens - 1
    out = _flat(bonus_tokens, "bonus_tokens")
    out[:bs] = _flat(accept_tokens, "accept_tokens")[idx].to(out.dtype)


def fill_accept_out_cache_loc_cpu(accept_index: torch.Tensor, out_cache_loc: torch.Tensor,
                                  accept_out_cache_loc: torch.Tensor,
                                  size: Optional[int] = None) -> None:
    """Compact out_cache_loc at the accepted indices (accept_index > -1), in order, into the
    front of accept_out_cache_loc. SGLang 0.5.23 calls it with three arguments (the whole
    accept_index); older sgl_kernel builds took `size`, accepted here for compatibility."""
    ai = _flat(accept_index, "accept_index")
    if size is not None:
        ai = ai[:size]
    src = ai[ai > -1].long()
    out = _flat(accept_out_cache_loc, "accept_out_cache_loc")
    out[: src.numel()] = _flat(out_cache_loc, "out_cache_loc")[src].to(out.dtype)


# ---- cache_locs.py ----------------------------------------------------------------------

def assign_draft_cache_locs_contiguous_cpu(req_pool_indices: torch.Tensor,
                                           req_to_token: torch.Tensor, seq_lens: torch.Tensor,
                                           out_cache_loc: torch.Tensor, pool_len: int,
                                           topk: int, num_steps: int) -> None:
    """out_cache_loc[i * topk * num_steps + j] = req_to_token[rpi[i], seq_lens[i] + j] for
    j < topk * num_steps: the draft slots the allocator reserved right after each prefix."""
    bs, width = req_pool_indices.numel(), topk * num_steps
    base = (_flat(req_pool_indices, "req_pool_indices").long() * pool_len
            + _flat(seq_lens, "seq_lens").long())
    src = (base[:, None] + torch.arange(width, device=base.device)).reshape(-1)
    out = _flat(out_cache_loc, "out_cache_loc")
    out[: bs * width] = _flat(req_to_token, "req_to_token")[src].to(out.dtype)


def assign_extend_cache_locs_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """Gather req_to_token[rpi[i], start[i]:end[i]] for every request, packed back to back
    into out_cache_loc (the verify/extend slots); entries past the total stay untouched."""
    row, pos, dst = _ragged(start_offset, end_offset)
    rpi = _flat(req_pool_indices, "req_pool_indices").long()
    out = _flat(out_cache_loc, "out_cache_loc")
    out[dst] = _flat(req_to_token, "req_to_token")[rpi[row] * pool_len + pos].to(out.dtype)


# ---- mem_cache/allocation.py ------------------------------------------------------------

def assign_req_to_token_pool_cpu(req_pool_indices: torch.Tensor, req_to_token: torch.Tensor,
                                 start_offset: torch.Tensor, end_offset: torch.Tensor,
                                 out_cache_loc: torch.Tensor, pool_len: int) -> None:
    """The inverse scatter: req_to_token[rpi[i], start[i]:end[i]] = the i-th packed segment of
    out_cache_loc. alloc_for_spec_decode calls it every speculative decode step on CPU."""
    row, pos, dst = _ragged(start_offset, end_offset)
    rpi = _flat(req_pool_indices, "req_pool_indices").long()
    table = _flat(req_to_token, "req_to_token")
    table[rpi[row] * pool_len + pos] = _flat(out_cache_loc, "out_cache_loc")[dst].to(table.dtype)


# ---- kvcache/cache_move.py --------------------------------------------------------------

def copy_all_layer_kv_cache_cpu(data_ptrs: torch.Tensor, strides: torch.Tensor,
                                tgt_loc: torch.Tensor, src_loc: torch.Tensor) -> None:
    """For every K/V buffer b (base address data_ptrs[b], strides[b] bytes per slot row):
    row tgt_loc[i] = row src_loc[i]. The pool hands over raw addresses, not tensors, so
    each buffer is viewed through ctypes up to the highest row touched. All source rows are
    gathered before any target row is written, so overlapping src/tgt are safe."""
    if data_ptrs.device.type != "cpu":
        raise ValueError("copy_all_layer_kv_cache_cpu needs CPU buffers")
    tgt = _flat(tgt_loc, "tgt_loc").long()
    src = _flat(src_loc, "src_loc").long()
    if tgt.numel() != src.numel():
        raise ValueError("tgt_loc and src_loc must have the same length")
    if tgt.numel() == 0:
        return
    if min(int(tgt.min()), int(src.min())) < 0:
        raise IndexError("copy_all_layer_kv_cache_cpu: negative slot index")
    rows = max(int(tgt.max()), int(src.max())) + 1
    # uint64 -> int64 reinterprets the bits; user-space addresses are below 2**63.
    for ptr, stride in zip(_flat(data_ptrs, "data_ptrs").view(torch.int64).tolist(),
                           _flat(strides, "strides").tolist()):
        raw = (ctypes.c_uint8 * (rows * stride)).from_address(ptr)
        buf = torch.frombuffer(raw, dtype=torch.uint8).view(rows, stride)
        buf[tgt] = buf[src]  # advanced indexing on the right makes a copy first


# ---- spec_tree.py -----------------------------------------------------------------------

def _tree_parents(parent_list, selected_index, bs, n, topk, depth):
    """Tree position of each draft node's parent, [bs, n]: node i >= 1 is the candidate
    selected_index[b, i-1]; its parent is parent_list[b, sel // topk] (0 there means the
    root), found again among the selected candidates. -1: root, or a parent that was not
    selected (the kernels skip such a node)."""
    pstride, sstride = topk * (depth - 1) + 1, n - 1
    if sstride == 0:  # a lone root
        return torch.full((bs, 1), -1, dtype=torch.long)
    b = torch.arange(bs)[:, None]
    sel = _flat(selected_index, "selected_index")[: bs * sstride].long().view(bs, sstride)
    ptb = torch.div(sel, topk, rounding_mode="trunc")  # C++ integer division
    has = ptb > 0
    parent_tok = torch.zeros_like(sel)
    parent_tok[has] = _flat(parent_list, "parent_list")[(b * pstride + ptb)[has]].long()
    match = sel[:, None, :] == parent_tok[:, :, None]  # [bs, node, candidate]
    first = match.long().argmax(-1)  # argmax returns the first of equal maxima
    parent = torch.where(has, torch.where(match.any(-1), first + 1, -1), 0)
    return torch.cat([torch.full((bs, 1), -1, dtype=torch.long), parent], dim=1)


def build_tree_kernel_efficient_cpu(parent_list: torch.Tensor, selected_index: torch.Tensor,
                                    verified_seq_len: torch.Tensor, tree_mask: torch.Tensor,
                                    positions: torch.Tensor, retrive_index: torch.Tensor,
                                    retrive_next_token: torch.Tensor,
                                    retrive_next_sibling: torch.Tensor, topk: int, depth: int,
                                    draft_token_num: int, tree_mask_mode: int) -> None:
    """Build the EAGLE draft tree: tree_mask (node row attends to itself, its ancestors and
    the root), positions (prefix length + depth), and the retrieval links (first child /
    next sibling, children in index order) that verify_tree_greedy walks."""
    if int(tree_mask_mode) == QLEN_ONLY_BITPACKING:
        # As the C++ CPU kernel: no CPU worker produces a bit-packed mask.
        raise NotImplementedError("build_tree_kernel_efficient_cpu: QLEN_ONLY_BITPACKING "
                                  "is not supported on CPU")
    bs, n = verified_seq_len.numel(), draft_token_num
    seq = _flat(verified_seq_len, "verified_seq_len").long()
    parent = _tree_parents(parent_list, selected_index, bs, n, topk, depth)
    node = torch.arange(n)
    rows = torch.arange(bs)[:, None]

    _flat(retrive_index, "retrive_index")[: bs * n] = (
        (rows * n + node).reshape(-1).to(retrive_index.dtype))

    # Links. The kernels insert children i = n-1 .. 1 at the head of their parent's list:
    # rnt[p] ends as p's smallest child, rns[i] as the next larger child of the same
    # parent, and the largest child inherits rnt[p]'s old value unless that was -1.
    rnt = _flat(retrive_next_token, "retrive_next_token")[: bs * n].view(bs, n)
    rns = _flat(retrive_next_sibling, "retrive_next_sibling")[: bs * n].view(bs, n)
    valid = parent >= 0
    is_child = parent[:, None, :] == node[None, :, None]  # [bs, p, i]
    first_child = torch.where(is_child, node, n).min(-1).values
    later_sib = ((parent[:, :, None] == parent[:, None, :]) & valid[:, None, :]
                 & (node[None, :] > node[:, None]))  # [bs, i, k]: k > i, same parent
    next_sib = torch.where(later_sib, node, n).min(-1).values
    old_head = rnt.long().gather(1, parent.clamp(min=0))
    new_rns = torch.where(valid & (next_sib < n), next_sib,
                          torch.where(valid & (old_head != -1), old_head, rns.long()))
    rns.copy_(new_rns.to(rns.dtype))
    rnt.copy_(torch.where(first_child < n, first_child, rnt.long()).to(rnt.dtype))

    # Mask rows and depths: climb from each node through its ancestors to the root.
    tree = torch.zeros(bs, n, n, dtype=torch.bool)
    tree[:, :, 0] = True
    depth_of = torch.zeros(bs, n, dtype=torch.long)
    cur = node.expand(bs, n).clone()
    alive = cur > 0
    for _ in range(n):  # a path visits each node at most once
        if not alive.any():
            break
        b_idx, t_idx = alive.nonzero(as_tuple=True)
        tree[b_idx, t_idx, cur[alive]] = True
        depth_of += alive
        up = parent.gather(1, cur)
        alive &= up > 0  # 0: reached the root (column 0 is set); -1: parent not found
        cur = torch.where(alive, up, cur)
    pos = _flat(positions, "positions")
    pos[: bs * n] = (seq[:, None] + depth_of).reshape(-1).to(pos.dtype)

    if int(tree_mask_mode) == QLEN_ONLY:
        row_start = (rows * n + node) * n  # [bs, n, n] blocks, one per request
    else:
        # FULL_MASK: request b's rows are seq_len + n wide (prefix columns first, left as
        # the caller filled them) and start after all earlier requests' rows.
        before = torch.cumsum(seq, 0) - seq
        block = rows * n * n + before[:, None] * n
        row_start = block + (seq[:, None] + n) * node + seq[:, None]
    mask = _flat(tree_mask, "tree_mask")
    mask[(row_start[:, :, None] + node).reshape(-1)] = tree.reshape(-1).to(mask.dtype)


def verify_tree_greedy_cpu(predicts: torch.Tensor, accept_index: torch.Tensor,
                           accept_token_num: torch.Tensor, candidates: torch.Tensor,
                           retrive_index: torch.Tensor, retrive_next_token: torch.Tensor,
                           retrive_next_sibling: torch.Tensor,
                           target_predict: torch.Tensor) -> None:
    """Greedy verification: from the root, step to the first child, scan its siblings for
    the draft token equal to the target's prediction at the last accepted node, accept it
    and descend; stop at a level with no match. Writes predicts[accepted nodes] (the target
    token there), accept_index[b, :1 + accepted], accept_token_num[b] (bonus excluded).
    Vectorised over the batch; the walk itself is sequential per level."""
    bs, n = candidates.shape[0], candidates.shape[1]
    steps = accept_index.shape[1]
    ri = _flat(retrive_index, "retrive_index").long().view(bs, n)
    rnt = _flat(retrive_next_token, "retrive_next_token").long().view(bs, n)
    rns = _flat(retrive_next_sibling, "retrive_next_sibling").long().view(bs, n)
    cand = _flat(candidates, "candidates").long().view(bs, n)
    target = _flat(target_predict, "target_predict").long()
    pred = _flat(predicts, "predicts")
    acc = _flat(accept_index, "accept_index").view(bs, steps)
    rows = torch.arange(bs)

    last = ri[:, 0].clone()  # flat index of the last accepted node
    acc[:, 0] = last.to(acc.dtype)
    num = torch.zeros(bs, dtype=torch.long)
    cur = torch.zeros(bs, dtype=torch.long)
    alive = torch.ones(bs, dtype=torch.bool)
    for _ in range(1, steps):
        if not alive.any():
            break
        cur = torch.where(alive, rnt[rows, cur], cur)
        searching = alive & (cur != -1)
        want = target[last]
        matched = torch.zeros(bs, dtype=torch.bool)
        for _ in range(n):  # each sibling list has fewer than n entries
            if not searching.any():
                break
            c = cur.clamp(min=0)
            hit = searching & (cand[rows, c] == want)
            pred[last[hit]] = want[hit].to(pred.dtype)
            num += hit
            acc[rows[hit], num[hit]] = ri[rows[hit], c[hit]].to(acc.dtype)
            last = torch.where(hit, ri[rows, c], last)
            matched |= hit
            searching &= ~hit
            cur = torch.where(searching, rns[rows, c], cur)
            searching &= cur != -1
        alive = matched  # a level without a match ends the walk
    _flat(accept_token_num, "accept_token_num")[:bs] = num.to(accept_token_num.dtype)
    pred[last] = target[last].to(pred.dtype)


# ---- reconstruct_tree.py (imported as sgl_kernel.speculative.*) ------------------------

def reconstruct_indices_from_tree_mask(tree_mask: torch.Tensor, verified_seq_len: torch.Tensor,
                                       positions: torch.Tensor, retrive_index: torch.Tensor,
                                       retrive_next_token: torch.Tensor,
                                       retrive_next_sibling: torch.Tensor, batch_size: int,
                                       draft_token_num: int) -> None:
    """NGRAM verify metadata from its [bs, n, n] mask (mask[b, i, j]: j is an ancestor of
    i; only j < i counts): positions = prefix length + #ancestors, parent = nearest
    ancestor, first child = smallest later node having tid as ancestor, next sibling =
    smallest later node with the same parent (-1 for roots)."""
    bs, n = int(batch_size), int(draft_token_num)
    if bs == 0:
        return
    m = _flat(tree_mask, "tree_mask")[: bs * n * n].view(bs, n, n) != 0
    node = torch.arange(n)
    anc = m & (node[None, :] < node[:, None])  # [bs, i, j], strict lower triangle
    depth = anc.sum(-1)
    parent = torch.where(anc, node, -1).max(-1).values
    first_child = torch.where(anc, node[:, None], n).min(1).values  # over rows i, per column
    later_sib = ((parent[:, :, None] == parent[:, None, :])
                 & (node[:, None] > node[None, :]))  # [bs, k, t]: k > t, same parent
    next_sib = torch.where(later_sib, node[:, None], n).min(1).values
    seq = _flat(verified_seq_len, "verified_seq_len")[:bs].long()
    outs = (
        (positions, seq[:, None] + depth),
        (retrive_index, torch.arange(bs)[:, None] * n + node),
        (retrive_next_token, torch.where(first_child < n, first_child, -1)),
        (retrive_next_sibling, torch.where((parent >= 0) & (next_sib < n), next_sib, -1)),
    )
    for out, value in outs:
        _flat(out, "output")[: bs * n] = value.reshape(-1).to(out.dtype)

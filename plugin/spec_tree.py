"""Draft trees at speculative verify: the window rule along each path, and which drafted
tokens a sequential decoder would have drawn. Pure torch, batched over requests; no
SGLang import (patches/spec_verify.py drives it).

A verify step holds, per request, a tree of D nodes: node 0 is the root (the request's
pending token, drawn last step), every other node a drafted token whose parent is the
node before it on its path. SGLang describes the tree by links: next_token[b, j] is
node j's first child, next_sibling[b, j] its next sibling (-1: none).
"""
from __future__ import annotations

import torch


def parents_of(next_token: torch.Tensor, next_sibling: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(parent [B, D] with -1 at the root, depth [B, D]) from SGLang's tree links.
    D rounds of scatter: a sibling inherits its elder sibling's parent, a child's depth
    is its parent's plus one (D is the tree size, a handful)."""
    b, d = next_token.shape
    nodes = torch.arange(d, device=next_token.device).expand(b, d)
    parent = torch.full((b, d + 1), -1, dtype=torch.long, device=next_token.device)  # column d: sink
    first = next_token.long().masked_fill(next_token < 0, d)
    parent.scatter_(1, first, nodes.clone())
    sib = next_sibling.long().masked_fill(next_sibling < 0, d)
    for _ in range(d):
        parent.scatter_(1, sib, parent[:, :d].clone())
    parent = parent[:, :d]
    parent[:, 0] = -1
    depth = torch.zeros((b, d), dtype=torch.long, device=next_token.device)
    for _ in range(d):
        depth = torch.where(parent >= 0, depth.gather(1, parent.clamp(min=0)) + 1, depth)
    return parent, depth


def judged_along_paths(scores: torch.Tensor, parent: torch.Tensor, depth: torch.Tensor,
                       recent: torch.Tensor) -> torch.Tensor:
    """Each node's score under the window rule: the minimum of its own score and the
    window-1 scores before it on its path, first its tree ancestors, then the request's
    recent committed scores (recent [B, window-1], oldest first, +inf where none).
    This is the sequential rule, since an accepted ancestor is committed before its
    child is judged."""
    w1 = recent.shape[1]
    judged = scores.clone()
    node = torch.arange(scores.shape[1], device=scores.device).expand_as(parent)
    for k in range(1, w1 + 1):
        in_tree = k <= depth
        node = torch.where(parent.gather(1, node) >= 0, parent.gather(1, node), node)
        tree_score = scores.gather(1, node)
        hist = recent.gather(1, (w1 - (k - depth)).clamp(0, w1 - 1))
        judged = torch.minimum(judged, torch.where(in_tree, tree_score, hist))
    return judged


def mask_in_parent_rows(logits: torch.Tensor, parent: torch.Tensor, tokens: torch.Tensor,
                        blocked: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Set each blocked node's token to -inf in its parent's row of the verify logits
    (logits [B * D, V], request b's node j in row b * D + j), so greedy and sampled
    verification neither accept it nor draw it there: the parent row's next best is the
    re-draw. Returns (rows, tokens, their logits before the mask)."""
    d = parent.shape[1]
    b, j = blocked.nonzero(as_tuple=True)
    rows, toks = b * d + parent[b, j], tokens[b, j]
    saved = logits[rows, toks].clone()
    logits[rows, toks] = float("-inf")
    return rows, toks, saved


def shift_in(recent: torch.Tensor, new: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The last window-1 committed scores after committing counts[b] scores new[b, :n]
    (new [B, M], left-aligned) to recent [B, window-1]."""
    w1 = recent.shape[1]
    if not w1:
        return recent
    joined = torch.cat([recent, new], dim=1)  # [B, w1 + M]
    end = w1 + counts.long()
    idx = end[:, None] - w1 + torch.arange(w1, device=recent.device)[None, :]
    return joined.gather(1, idx)


def forced_chain(tokens: torch.Tensor, parent: torch.Tensor, depth: torch.Tensor,
                 queue: torch.Tensor) -> torch.Tensor:
    """[B, D] bool: the drafted nodes that spell a request's forced tokens (the rest of a
    pivot) from the root down: node j at depth k is on the chain when its parent is and
    its token is queue[b, k-1] (queue [B, Q], -1 past the end; one sibling per level, the
    first). Only these nodes may be accepted for a forcing request, one step for up to
    D-1 pivot tokens instead of one step each."""
    b, d = tokens.shape
    on = torch.zeros((b, d), dtype=torch.bool, device=tokens.device)
    if not queue.shape[1]:
        return on
    on[:, 0] = queue[:, 0] >= 0  # the root of a request with tokens left to force
    padded = torch.cat([queue, torch.full((b, d), -1, dtype=queue.dtype, device=queue.device)], dim=1)
    want = padded.gather(1, (depth - 1).clamp(min=0))  # the token node j must carry
    node = torch.arange(d, device=tokens.device).expand(b, d)
    for level in range(1, d):
        fits = (depth == level) & on.gather(1, parent.clamp(min=0)) & (tokens == want) & (want >= 0)
        first = torch.where(fits, node, d).min(dim=1).values  # one node per level
        on |= fits & (node == first[:, None])
    on[:, 0] = False
    return on


def force_in_parent_rows(logits: torch.Tensor, parent: torch.Tensor, tokens: torch.Tensor,
                         forced: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Leave each forced node's token the only finite logit in its parent's row, so greedy
    and sampled verification both accept it. Returns (rows, their logits before) to put
    back once verification has run."""
    d = parent.shape[1]
    b, j = forced.nonzero(as_tuple=True)
    rows, toks = b * d + parent[b, j], tokens[b, j]
    saved = logits[rows].clone()
    logits[rows] = float("-inf")
    logits[rows, toks] = saved[torch.arange(rows.numel(), device=rows.device), toks]
    return rows, saved


def unmask_drawn(logits: torch.Tensor, rows: torch.Tensor, drawn: torch.Tensor) -> int:
    """Where a verify kernel drew a token its (masked) row gives -inf, the row's best finite
    token instead; returns how many were replaced (one host sync). Greedy never does this;
    SGLang's CUDA sampled verify does when the residual it samples the bonus from is empty (every
    candidate of the row was drafted and rejected, coin near 1): it falls back to token
    vocab-1 whatever its logit, which can be a vetoed one (bench/spec_verify_cuda.py)."""
    bad = torch.isneginf(logits[rows, drawn.long()])
    replaced = int(bad.sum())
    if replaced:
        drawn[bad] = logits[rows[bad]].argmax(dim=-1).to(drawn.dtype)
    return replaced

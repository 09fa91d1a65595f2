"""The pure-torch sgl_kernel ops for speculative decoding on CPU
(launch/cpu_kernels/sgl_kernel/spec_ops.py) against plain-loop references.

Each reference here is written independently from the kernels' semantics -- the C++ CPU
kernels (sgl-kernel/csrc/cpu/spec.cpp, kvcache.cpp) and, where only the GPU code says it,
their Triton/CUDA twins in sglang/kernels/ops/** -- as straightforward Python loops over the
batch and the tree. Every tensor an op mutates is compared for exact equality, untouched
entries included, on many random inputs: random batch sizes, EAGLE trees drawn the way its
draft builds them (random topk, steps, draft counts), NGRAM masks from random parent lists
and arbitrary masks, both tree-mask modes the CPU path supports.

The same random cases are run against the real CUDA/Triton kernels by
bench/spec_kernels_cuda.py when a GPU is available.
"""
from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
KERNELS = REPO / "launch" / "cpu_kernels"
PYTHON = sys.executable

# Load the source file by path: the repo's copy is what is under test, whatever the venv has.
_spec = importlib.util.spec_from_file_location("_tokenwise_spec_ops",
                                               KERNELS / "sgl_kernel" / "spec_ops.py")
ops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ops)

FULL_MASK, QLEN_ONLY = 0, 1
SEEDS = range(4)
CASES = 50  # per seed, so 200 random cases per op


def t(values, dtype=torch.int64):
    return torch.tensor(values, dtype=dtype)


def rand_ints(rng, count, lo=-(2 ** 20), hi=2 ** 20):
    return [rng.randint(lo, hi) for _ in range(count)]


# ---- random inputs ----------------------------------------------------------------------

def eagle_tree(rng, topk, steps, n):
    """One request's (parent_list row, selected_index row) as EAGLE's draft builds them
    (spec_utils.select_top_k_tokens, eagle_utils.organize_draft_results): step 0 proposes
    topk children of the root (candidates 0..topk-1); step i >= 1 expands the topk nodes
    kept at step i-1 into topk*topk candidates numbered from topk + (i-1)*topk*topk, the
    r-th kept node's children at r*topk..; it keeps the topk best. parent_list lists the
    root (-1), then the candidates kept at steps 0..steps-2; the tree is the n-1
    best-scoring candidates, sorted. A child scores below its parent, so every selected
    candidate's parent is selected too."""
    score = {c: rng.uniform(0.01, 0.99) for c in range(topk)}
    parents, kept = [-1] + list(range(topk)), list(range(topk))
    for i in range(1, steps):
        base = topk + (i - 1) * topk * topk
        cands = {base + r * topk + c: score[p] * rng.uniform(0.01, 0.99)
                 for r, p in enumerate(kept) for c in range(topk)}
        score.update(cands)
        kept = sorted(cands, key=cands.get, reverse=True)[:topk]
        rng.shuffle(kept)  # the order the kept nodes come in is arbitrary
        if i < steps - 1:
            parents += kept
    if steps == 1:
        parents = []  # organize_draft_results: an empty [bs, 0] parent_list
    chosen = sorted(sorted(score, key=score.get, reverse=True)[: n - 1])
    return parents, chosen


def eagle_batch(rng, max_bs=6):
    bs = rng.randint(1, max_bs)
    topk = rng.randint(1, 4)
    steps = rng.randint(1, 5)
    most = 1 + topk + (steps - 1) * topk * topk
    n = rng.randint(1, min(most, 24))
    rows = [eagle_tree(rng, topk, steps, n) for _ in range(bs)]
    return bs, topk, steps, n, [r[0] for r in rows], [r[1] for r in rows]


def random_parents(rng, n, forest=False):
    """parent[i] < i: node 0 the root; with `forest`, some later nodes are roots too."""
    return [-1] + [(-1 if forest and rng.random() < 0.2 else rng.randrange(i))
                   for i in range(1, n)]


def ngram_mask(parents):
    """NGRAM's mask: row i marks i itself and its ancestors."""
    n = len(parents)
    mask = [[False] * n for _ in range(n)]
    for i in range(n):
        j = i
        while j != -1:
            mask[i][j] = True
            j = parents[j]
    return mask


# ---- references ---------------------------------------------------------------------------

def ref_fill_bonus(accept_tokens, accept_lens, stride, bonus):
    flat = [x for row in accept_tokens for x in row]
    for i, length in enumerate(accept_lens):
        bonus[i] = flat[stride * i + length - 1]  # accept_lens counts the bonus token


def ref_fill_accept(accept_index, out_cache_loc, out):
    # Triton twin: program pid writes at the count of earlier entries that are not -1.
    for pid, src in enumerate(accept_index):
        if src > -1:
            out[sum(1 for x in accept_index[:pid] if x != -1)] = out_cache_loc[src]


def ref_assign_draft(rpi, table, seq_lens, out, width):
    for i, (req, start) in enumerate(zip(rpi, seq_lens)):
        for j in range(width):
            out[i * width + j] = table[req][start + j]


def ref_assign_extend(rpi, table, start, end, out):
    k = 0
    for req, a, b in zip(rpi, start, end):
        for pos in range(a, b):
            out[k] = table[req][pos]
            k += 1


def ref_assign_req_to_token(rpi, table, start, end, out_cache_loc):
    k = 0
    for req, a, b in zip(rpi, start, end):
        for pos in range(a, b):
            table[req][pos] = out_cache_loc[k]
            k += 1


def ref_build_tree(parent_list, sel, seq, mask, positions, ri, rnt, rns, topk, n, mode):
    """Loops after the CUDA kernel (build_tree_efficient) and the C++ CPU kernel; mask and
    positions are flat lists, the rest per-request lists."""
    for b in range(len(seq)):
        def parent_pos(node):  # tree position of node's parent; 0 the root, None: not selected
            slot = sel[b][node - 1] // topk
            if slot == 0:
                return 0
            for pp in range(n - 1):
                if sel[b][pp] == parent_list[b][slot]:
                    return pp + 1
            return None

        ri[b][0] = b * n
        positions[b * n] = seq[b]
        for i in range(n - 1, 0, -1):  # each child goes to the head of its parent's list
            ri[b][i] = b * n + i
            p = parent_pos(i)
            if p is None:
                continue
            if rnt[b][p] != -1:
                rns[b][i] = rnt[b][p]
            rnt[b][p] = i
        for tid in range(n):
            if mode == FULL_MASK:  # rows seq+n wide, the first seq columns the prefix
                row = b * n * n + n * sum(seq[:b]) + (seq[b] + n) * tid + seq[b]
            else:
                row = (b * n + tid) * n
            mask[row] = True
            for j in range(1, n):
                mask[row + j] = False
            if tid == 0:
                continue
            depth, node = 0, tid
            while True:
                depth += 1
                mask[row + node] = True
                p = parent_pos(node)
                if not p:  # reached the root, or the parent was not selected
                    break
                node = p
            positions[b * n + tid] = seq[b] + depth


def ref_verify(predicts, accept_index, accept_num, cand, ri, rnt, rns, target):
    for b in range(len(cand)):
        last = ri[b][0]
        accept_index[b][0] = last
        num, cur = 0, 0
        for _ in range(1, len(accept_index[b])):
            cur = rnt[b][cur]
            while cur != -1:
                if cand[b][cur] == target[last]:
                    predicts[last] = target[last]
                    num += 1
                    accept_index[b][num] = ri[b][cur]
                    last = ri[b][cur]
                    break
                cur = rns[b][cur]
            if cur == -1:
                break
        accept_num[b] = num
        predicts[last] = target[last]


def ref_reconstruct(mask, seq, positions, ri, rnt, rns, n):
    """After the CUDA kernel reconstructIndicesFromTreeMask; mask per request [n][n]."""
    for b in range(len(seq)):
        m = mask[b]
        for tid in range(n):
            depth, parent = 0, -1
            for i in range(tid - 1, -1, -1):
                if m[tid][i]:
                    depth += 1
                    if parent == -1:
                        parent = i
            ri[b][tid] = b * n + tid
            positions[b * n + tid] = depth + seq[b]
            rnt[b][tid] = next((i for i in range(tid + 1, n) if m[i][tid]), -1)
            rns[b][tid] = -1
            if parent != -1:
                for i in range(tid + 1, n):
                    # i's nearest ancestor is `parent`: nothing marked strictly between
                    if m[i][parent] and not any(m[i][parent + 1:i]):
                        rns[b][tid] = i
                        break


# ---- eagle.py ops -------------------------------------------------------------------------

def case_fill_bonus(rng):
    bs, stride = rng.randint(0, 8), rng.randint(1, 8)
    tokens = [rand_ints(rng, stride) for _ in range(bs)]
    lens = [rng.randint(1, stride) for _ in range(bs)]
    bonus = rand_ints(rng, bs)
    args = (t(tokens, torch.int32).view(bs, stride), t(lens, torch.int32),
            t(bonus, torch.int32), stride)
    ref_fill_bonus(tokens, lens, stride, bonus)
    return args, bonus


@pytest.mark.parametrize("seed", SEEDS)
def test_fill_bonus_tokens(seed):
    rng = random.Random(seed)
    for _ in range(CASES):
        (tokens, lens, bonus, stride), want = case_fill_bonus(rng)
        ops.fill_bonus_tokens_cpu(tokens, lens, bonus, stride)
        assert bonus.tolist() == want


def case_fill_accept(rng):
    bs, width = rng.randint(0, 8), rng.randint(1, 6)
    slots = rng.randint(bs * width, bs * width + 10)
    picks = rng.sample(range(slots), bs * width)  # distinct accepted indices
    accept = [[picks[b * width + j] if j < keep else -1 for j in range(width)]
              for b in range(bs) for keep in [rng.randint(1, width)]]
    flat = [x for row in accept for x in row]
    out_cache_loc = rand_ints(rng, slots, 0)
    out = rand_ints(rng, bs * width)
    args = (t(flat, torch.int32).view(bs, width), t(out_cache_loc), t(out))
    ref_fill_accept(flat, out_cache_loc, out)
    return args, out


@pytest.mark.parametrize("seed", SEEDS)
def test_fill_accept_out_cache_loc(seed):
    rng = random.Random(seed)
    for k in range(CASES):
        (accept, ocl, out), want = case_fill_accept(rng)
        if k % 2:  # SGLang 0.5.23 passes three arguments; older builds passed size too
            ops.fill_accept_out_cache_loc_cpu(accept, ocl, out)
        else:
            ops.fill_accept_out_cache_loc_cpu(accept, ocl, out, accept.numel())
        assert out.tolist() == want


# ---- cache_locs.py / allocation.py ops ----------------------------------------------------

def req_table(rng, bs, pool_len):
    rows = bs + rng.randint(0, 4)
    table = [rand_ints(rng, pool_len, 0, 2 ** 30) for _ in range(rows)]
    rpi = rng.sample(range(rows), bs)
    return table, rpi


def index_dtype(rng):
    return rng.choice([torch.int32, torch.int64])


def case_assign_draft(rng):
    bs, topk, steps = rng.randint(0, 6), rng.randint(1, 4), rng.randint(1, 5)
    width = topk * steps
    pool_len = width + rng.randint(0, 20)
    table, rpi = req_table(rng, bs, pool_len)
    seq_lens = [rng.randint(0, pool_len - width) for _ in range(bs)]
    out = rand_ints(rng, bs * width)
    args = (t(rpi, index_dtype(rng)), t(table, torch.int32), t(seq_lens, index_dtype(rng)),
            t(out), pool_len, topk, steps)
    ref_assign_draft(rpi, table, seq_lens, out, width)
    return args, out


@pytest.mark.parametrize("seed", SEEDS)
def test_assign_draft_cache_locs_contiguous(seed):
    rng = random.Random(seed)
    for _ in range(CASES):
        args, want = case_assign_draft(rng)
        ops.assign_draft_cache_locs_contiguous_cpu(*args)
        assert args[3].tolist() == want


def ragged(rng, bs, pool_len):
    start = [rng.randint(0, pool_len) for _ in range(bs)]
    end = [rng.randint(a, min(pool_len, a + 9)) for a in start]  # empty ranges included
    return start, end


def case_assign_extend(rng):
    bs, pool_len = rng.randint(0, 6), rng.randint(1, 30)
    table, rpi = req_table(rng, bs, pool_len)
    start, end = ragged(rng, bs, pool_len)
    total = sum(b - a for a, b in zip(start, end))
    out = rand_ints(rng, total + rng.randint(0, 5))  # the tail must stay untouched
    dt = index_dtype(rng)
    args = (t(rpi, index_dtype(rng)), t(table, torch.int32), t(start, dt), t(end, dt),
            t(out), pool_len)
    ref_assign_extend(rpi, table, start, end, out)
    return args, out


@pytest.mark.parametrize("seed", SEEDS)
def test_assign_extend_cache_locs(seed):
    rng = random.Random(seed)
    for _ in range(CASES):
        args, want = case_assign_extend(rng)
        ops.assign_extend_cache_locs_cpu(*args)
        assert args[4].tolist() == want


def case_assign_req_to_token(rng):
    bs, pool_len = rng.randint(0, 6), rng.randint(1, 30)
    table, rpi = req_table(rng, bs, pool_len)
    start, end = ragged(rng, bs, pool_len)
    total = sum(b - a for a, b in zip(start, end))
    out_cache_loc = rand_ints(rng, total + rng.randint(0, 5), 0, 2 ** 30)
    dt = index_dtype(rng)
    args = (t(rpi, index_dtype(rng)), t(table, torch.int32), t(start, dt), t(end, dt),
            t(out_cache_loc), pool_len)
    ref_assign_req_to_token(rpi, table, start, end, out_cache_loc)
    return args, table


@pytest.mark.parametrize("seed", SEEDS)
def test_assign_req_to_token_pool(seed):
    rng = random.Random(seed)
    for _ in range(CASES):
        args, want = case_assign_req_to_token(rng)
        ops.assign_req_to_token_pool_cpu(*args)
        assert args[1].tolist() == want


# ---- cache_move.py ------------------------------------------------------------------------

def kv_buffers(rng, rows):
    shapes = [(rows, 4, 8), (rows, 16), (rows, 2, 3), (rows, 5)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.uint8]
    bufs = []
    for _ in range(rng.randint(1, 5)):
        x = torch.randint(-100, 100, rng.choice(shapes),
                          generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
        bufs.append(x.to(rng.choice(dtypes)))
    return bufs


def ref_copy_all(bufs, tgt, src):
    for buf in bufs:
        staged = [buf[s].clone() for s in src]  # all sources before any target
        for dst, row in zip(tgt, staged):
            buf[dst] = row


@pytest.mark.parametrize("seed", SEEDS)
def test_copy_all_layer_kv_cache(seed):
    rng = random.Random(seed)
    for _ in range(CASES):
        rows = rng.randint(1, 40)
        bufs = kv_buffers(rng, rows)
        num = rng.randint(0, rows)
        tgt = rng.sample(range(rows), num)  # distinct targets; sources may overlap them
        src = [rng.randrange(rows) for _ in range(num)]
        want = [b.clone() for b in bufs]
        ref_copy_all(want, tgt, src)
        ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
        strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs])
        dt = index_dtype(rng)
        ops.copy_all_layer_kv_cache_cpu(ptrs, strides, t(tgt, dt), t(src, dt))
        for got, ref in zip(bufs, want):
            assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8))


def test_copy_all_layer_kv_cache_shifted_overlap():
    # A move whose targets are the sources one slot on: gather-then-scatter, not a smear.
    buf = torch.arange(10, dtype=torch.float32).repeat_interleave(3).view(10, 3)
    ptrs = torch.tensor([buf.data_ptr()], dtype=torch.uint64)
    strides = torch.tensor([buf.stride(0) * buf.element_size()])
    ops.copy_all_layer_kv_cache_cpu(ptrs, strides, t([3, 4, 5, 6]), t([2, 3, 4, 5]))
    assert buf[:, 0].tolist() == [0, 1, 2, 2, 3, 4, 5, 7, 8, 9]


# ---- spec_tree.py -------------------------------------------------------------------------

def case_build_tree(rng, mode, prefill_links=False):
    bs, topk, steps, n, parents, sel = eagle_batch(rng)
    seq = [rng.randint(0, 12) for _ in range(bs)]
    mask_len = (sum(seq) * n if mode == FULL_MASK else 0) + bs * n * n
    mask = [rng.random() < 0.5 for _ in range(mask_len)]  # prefix columns must survive
    positions = rand_ints(rng, bs * n)
    ri = [rand_ints(rng, n) for _ in range(bs)]
    if prefill_links:  # beyond the -1 contract: the head-insertion logic still holds
        rnt = [[rng.randint(-1, n - 1) for _ in range(n)] for _ in range(bs)]
        rns = [[rng.randint(-1, n - 1) for _ in range(n)] for _ in range(bs)]
    else:
        rnt, rns = [[-1] * n for _ in range(bs)], [[-1] * n for _ in range(bs)]
    dt = torch.int64 if rng.random() < 0.7 else torch.int32  # CUDA takes int64 only
    pl_width = topk * (steps - 1) + 1 if steps > 1 else 0
    args = (t(parents, dt).view(bs, pl_width), t(sel, dt).view(bs, n - 1), t(seq, dt),
            t(mask, torch.bool), t(positions, dt), t(ri, dt), t(rnt, dt), t(rns, dt),
            topk, steps, n, mode)
    ref_build_tree(parents, sel, seq, mask, positions, ri, rnt, rns, topk, n, mode)
    return args, (mask, positions, ri, rnt, rns)


@pytest.mark.parametrize("mode", [FULL_MASK, QLEN_ONLY], ids=["FULL_MASK", "QLEN_ONLY"])
@pytest.mark.parametrize("seed", SEEDS)
def test_build_tree_kernel_efficient(seed, mode):
    rng = random.Random(seed * 10 + mode)
    for k in range(CASES):
        args, want = case_build_tree(rng, mode, prefill_links=k % 5 == 4)
        ops.build_tree_kernel_efficient_cpu(*args)
        for got, ref in zip(args[3:8], want):
            assert got.tolist() == ref


def test_build_tree_example():
    """A hand-checked tree: topk=2, steps=3, 6 nodes.
    Candidates: step 0: 0, 1; step 1 (children of 0: 2, 3; of 1: 4, 5), kept [3, 4];
    step 2 (children of 3: 6, 7; of 4: 8, 9). Selected: 0, 1, 3, 4, 7 -> nodes 1..5.
    Tree: root -> {1 (cand 0), 2 (cand 1)}; 1 -> 3 (cand 3); 2 -> 4 (cand 4); 3 -> 5 (cand 7)."""
    parents = t([[-1, 0, 1, 3, 4]])
    sel = t([[0, 1, 3, 4, 7]])
    n = 6
    mask = torch.ones(n * n, dtype=torch.bool)
    positions = torch.zeros(n, dtype=torch.long)
    ri, rnt, rns = torch.full((3, 1, n), -1, dtype=torch.long)
    ops.build_tree_kernel_efficient_cpu(parents, sel, t([10]), mask, positions, ri, rnt, rns,
                                        2, 3, n, QLEN_ONLY)
    assert positions.tolist() == [10, 11, 11, 12, 12, 13]
    assert ri.tolist() == [[0, 1, 2, 3, 4, 5]]
    assert rnt.tolist() == [[1, 3, 4, 5, -1, -1]]
    assert rns.tolist() == [[-1, 2, -1, -1, -1, -1]]
    assert mask.view(n, n).int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 0, 1, 0, 1, 0],
        [1, 1, 0, 1, 0, 1],
    ]


def test_build_tree_rejects_bitpacking_like_the_cpu_kernel():
    args, _ = case_build_tree(random.Random(0), QLEN_ONLY)
    with pytest.raises(NotImplementedError):
        ops.build_tree_kernel_efficient_cpu(*args[:-1], 2)


def tree_links(rng):
    """(bs, n, retrive_next_token, retrive_next_sibling) of random trees: EAGLE trees via
    the build reference, or NGRAM trees via the reconstruct reference."""
    if rng.random() < 0.5:
        bs, topk, _, n, parents, sel = eagle_batch(rng)
        rnt, rns = [[-1] * n for _ in range(bs)], [[-1] * n for _ in range(bs)]
        ref_build_tree(parents, sel, [0] * bs, [False] * (bs * n * n), [0] * (bs * n),
                       [[0] * n for _ in range(bs)], rnt, rns, topk, n, QLEN_ONLY)
    else:
        bs, n = rng.randint(1, 6), rng.randint(1, 16)
        masks = [ngram_mask(random_parents(rng, n)) for _ in range(bs)]
        rnt, rns = [[0] * n for _ in range(bs)], [[0] * n for _ in range(bs)]
        ref_reconstruct(masks, [0] * bs, [0] * (bs * n), [[0] * n for _ in range(bs)],
                        rnt, rns, n)
    return bs, n, rnt, rns


def case_verify(rng):
    bs, n, rnt, rns = tree_links(rng)
    vocab = rng.randint(1, 4)  # a small vocabulary, so drafts often match
    cand = [[rng.randrange(vocab) for _ in range(n)] for _ in range(bs)]
    target = [rng.randrange(vocab) for _ in range(bs * n)]
    if rng.random() < 0.7:
        ri = [[b * n + i for i in range(n)] for b in range(bs)]  # what build_tree writes
    else:  # any flat index into predicts/target_predict
        perm = rng.sample(range(bs * n), bs * n)
        ri = [perm[b * n:(b + 1) * n] for b in range(bs)]
    steps = rng.randint(1, n + 1)
    predicts = rand_ints(rng, bs * n)
    accept_index = [[-1] * steps for _ in range(bs)]
    accept_num = rand_ints(rng, bs)
    dt = torch.int64 if rng.random() < 0.7 else torch.int32  # the C++ CPU kernel takes both
    args = (t(predicts, torch.int32), t(accept_index, torch.int32), t(accept_num, torch.int32),
            t(cand, dt), t(ri, dt), t(rnt, dt), t(rns, dt), t(target, dt).view(bs, n))
    ref_verify(predicts, accept_index, accept_num, cand, ri, rnt, rns, target)
    return args, (predicts, accept_index, accept_num)


@pytest.mark.parametrize("seed", SEEDS)
def test_verify_tree_greedy(seed):
    rng = random.Random(seed)
    accepted = 0
    for _ in range(CASES):
        args, want = case_verify(rng)
        names = ("predicts", "accept_index", "accept_token_num", "candidates", "retrive_index",
                 "retrive_next_token", "retrive_next_sibling", "target_predict")
        ops.verify_tree_greedy_cpu(**dict(zip(names, args)))  # SGLang passes keywords
        for got, ref in zip(args[:3], want):
            assert got.tolist() == ref
        accepted += sum(want[2])
    assert accepted > CASES  # the cases do exercise acceptance, not only rejection


# ---- reconstruct_tree.py ------------------------------------------------------------------

def case_reconstruct(rng):
    bs, n = rng.randint(0, 6), rng.randint(1, 16)
    kind = rng.choice(["tree", "forest", "any"])
    if kind == "any":  # the formulas hold for any mask; compare on arbitrary ones too
        density = rng.random()
        masks = [[[rng.random() < density for _ in range(n)] for _ in range(n)]
                 for _ in range(bs)]
    else:
        masks = [ngram_mask(random_parents(rng, n, kind == "forest")) for _ in range(bs)]
    seq = [rng.randint(0, 100) for _ in range(bs)]
    positions = rand_ints(rng, bs * n)
    ri, rnt, rns = ([rand_ints(rng, n) for _ in range(bs)] for _ in range(3))
    mask_dtype = rng.choice([torch.bool, torch.uint8])  # the CUDA op takes either
    args = (t(masks, mask_dtype).view(-1), t(seq), t(positions), t(ri).view(bs, n),
            t(rnt).view(bs, n), t(rns).view(bs, n), bs, n)
    ref_reconstruct(masks, seq, positions, ri, rnt, rns, n)
    return args, (positions, ri, rnt, rns)


@pytest.mark.parametrize("seed", SEEDS)
def test_reconstruct_indices_from_tree_mask(seed):
    rng = random.Random(seed)
    for _ in range(CASES):
        args, want = case_reconstruct(rng)
        ops.reconstruct_indices_from_tree_mask(*args)
        for got, ref in zip(args[2:6], want):
            assert got.tolist() == ref


def test_reconstruct_links_on_trees_are_first_child_and_next_sibling():
    """On a proper tree the links mean what verify_tree_greedy walks: a node's smallest
    child, and the next larger child of the same parent (ngram_worker._derive_tree_links
    says the same on the host side)."""
    rng = random.Random(7)
    for _ in range(40):
        bs, n = rng.randint(1, 5), rng.randint(1, 16)
        parents = [random_parents(rng, n, forest=rng.random() < 0.5) for _ in range(bs)]
        mask = t([ngram_mask(p) for p in parents], torch.bool).view(-1)
        positions = torch.zeros(bs * n, dtype=torch.long)
        ri, rnt, rns = torch.zeros(3, bs, n, dtype=torch.long)
        ops.reconstruct_indices_from_tree_mask(mask, t([5] * bs), positions, ri, rnt, rns, bs, n)
        for b, p in enumerate(parents):
            children = {i: [k for k in range(n) if p[k] == i] for i in range(-1, n)}
            siblings = [[k for k in children[p[i]] if k > i] if p[i] >= 0 else []
                        for i in range(n)]
            assert rnt[b].tolist() == [min(children[i], default=-1) for i in range(n)]
            assert rns[b].tolist() == [min(s, default=-1) for s in siblings]
            depth = [0] * n
            for i in range(n):
                depth[i] = depth[p[i]] + 1 if p[i] >= 0 else 0
            assert positions[b * n:(b + 1) * n].tolist() == [5 + d for d in depth]


# ---- the package wiring and SGLang's own call sites ------------------------------------

def run_python(code: str, **env) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that imports this checkout's sgl_kernel."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(KERNELS), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([PYTHON, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_package_exports_the_ops_and_still_refuses_the_rest():
    done = run_python(f"""
        import torch, sgl_kernel, sgl_kernel.speculative as spec, sgl_kernel.spec_ops as ops
        assert sgl_kernel.__file__.startswith({str(KERNELS)!r}), sgl_kernel.__file__
        from sgl_kernel import (fill_bonus_tokens_cpu, fill_accept_out_cache_loc_cpu,
            assign_draft_cache_locs_contiguous_cpu, assign_extend_cache_locs_cpu,
            assign_req_to_token_pool_cpu, copy_all_layer_kv_cache_cpu,
            build_tree_kernel_efficient_cpu, verify_tree_greedy_cpu)
        from sgl_kernel.speculative import reconstruct_indices_from_tree_mask
        assert reconstruct_indices_from_tree_mask is ops.reconstruct_indices_from_tree_mask
        assert fill_bonus_tokens_cpu is ops.fill_bonus_tokens_cpu
        for fn in (sgl_kernel.rotate_input_ids_cpu, sgl_kernel.silu_and_mul,
                   spec.tree_speculative_sampling_target_only,
                   __import__("sgl_kernel.kvcacheio").kvcacheio.transfer_kv_per_layer):
            try:
                fn()
            except sgl_kernel.MissingKernelOp:
                pass
            else:
                raise AssertionError(fn)
        assert not hasattr(torch.ops.sgl_kernel, "convert_weight_packed")
        print("ok")
        """)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def callsite_checks(cases: int = 6) -> None:
    """SGLang's own CPU call sites (the `_is_cpu` branches), fed through this checkout's
    sgl_kernel and compared with the references: argument order, keywords, the
    three-argument fill_accept_out_cache_loc call. Run in a subprocess with
    SGLANG_USE_CPU_ENGINE=1 by the test below."""
    import sgl_kernel
    from sglang.kernels.ops.kvcache import cache_move
    from sglang.kernels.ops.speculative import cache_locs, eagle, reconstruct_tree, spec_tree
    from sglang.srt.mem_cache import allocation

    assert sgl_kernel.__file__.startswith(str(KERNELS)) and eagle._is_cpu
    rng = random.Random(99)
    for _ in range(cases):
        (tokens, lens, bonus, stride), want = case_fill_bonus(rng)
        eagle.fill_bonus_tokens_func(tokens, lens, bonus, stride, lens.numel())
        assert bonus.tolist() == want

        (accept, ocl, out), want = case_fill_accept(rng)
        eagle.fill_accept_out_cache_loc_func(accept, ocl, out, accept.numel())
        assert out.tolist() == want

        args, want = case_assign_draft(rng)
        rpi, table, seq_lens, out, _, topk, steps = args
        cache_locs.assign_draft_cache_locs_contiguous_func(rpi, table, seq_lens, out, topk, steps)
        assert out.tolist() == want

        bs, width = rng.randint(1, 5), rng.randint(1, 6)  # verify: every row extends width
        table, rpi = req_table(rng, bs, width + 10)
        start = [rng.randint(0, 10) for _ in range(bs)]
        want = [0] * (bs * width)
        ref_assign_extend(rpi, table, start, [a + width for a in start], want)
        got = cache_locs.assign_extend_cache_locs_func(
            t(rpi), t(table, torch.int32), t(start), t(start) + width, bs, width, "cpu")
        assert got.tolist() == want

        window = [rand_ints(rng, width, 0) for _ in range(bs)]  # fill_front_out_cache_loc
        front = [rng.randint(1, width) for _ in range(bs)]
        want = rand_ints(rng, bs * width)
        out = t(want)
        ref_assign_extend(list(range(bs)), window, [0] * bs, front, want)
        cache_locs.fill_front_out_cache_loc_func(t(front, torch.int32), t(window).view(-1), out)
        assert out.tolist() == want

        args, want = case_assign_req_to_token(rng)
        rpi, table, start, end, ocl, _ = args
        allocation.assign_req_to_token_pool_func(rpi, table, start, end, ocl, rpi.numel())
        assert table.tolist() == want

        rows = rng.randint(2, 30)
        bufs = kv_buffers(rng, rows)
        num = rng.randint(1, rows)
        tgt, src = rng.sample(range(rows), num), [rng.randrange(rows) for _ in range(num)]
        want = [b.clone() for b in bufs]
        ref_copy_all(want, tgt, src)
        ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64)
        strides = torch.tensor([b.stride(0) * b.element_size() for b in bufs])
        padded = torch.cat([t(tgt), torch.zeros(3, dtype=torch.long)])  # func slices [:num]
        cache_move.copy_all_layer_kv_cache_func(ptrs, strides, padded, t(src), num, num, {})
        assert all(torch.equal(g.view(torch.uint8), w.view(torch.uint8))
                   for g, w in zip(bufs, want))

        for mode in (spec_tree.TreeMaskMode.FULL_MASK, spec_tree.TreeMaskMode.QLEN_ONLY):
            args, want = case_build_tree(rng, int(mode))
            spec_tree.build_tree_kernel_efficient_func(*args[:-1], mode)
            assert [a.tolist() for a in args[3:8]] == list(want)

        args, want = case_verify(rng)
        spec_tree.verify_tree_greedy_func(
            predicts=args[0], accept_index=args[1], accept_token_num=args[2],
            candidates=args[3], retrieve_index=args[4], retrieve_next_token=args[5],
            retrieve_next_sibling=args[6], target_predict=args[7], topk=2)
        assert [a.tolist() for a in args[:3]] == list(want)

        args, want = case_reconstruct(rng)
        reconstruct_tree.reconstruct_indices_from_tree_mask_func(*args)
        assert [a.tolist() for a in args[2:6]] == list(want)


def test_sglang_cpu_call_sites_reach_these_ops():
    if importlib.util.find_spec("sglang") is None:
        pytest.skip("sglang is not installed")
    done = run_python("""
        import test_spec_kernels
        test_spec_kernels.callsite_checks()
        print("ok")
        """, SGLANG_USE_CPU_ENGINE="1")
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-4000:]

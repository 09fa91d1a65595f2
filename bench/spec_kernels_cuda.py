#!/usr/bin/env python3
"""The tokenwise CPU sgl_kernel speculative ops against SGLang's real CUDA/Triton kernels.

On a machine with CUDA and sglang (with its sgl_kernel / JIT kernels) installed, this runs
random cases -- the same kinds tests/test_spec_kernels.py uses: random batches, EAGLE trees
drawn as its draft builds them, NGRAM masks from random parent lists and arbitrary masks --
through the GPU implementations in sglang.kernels.ops.* (and allocation.py) on a CUDA
device, and through our torch versions on CPU copies of the same inputs. Our versions are
imported by file path from launch/cpu_kernels/sgl_kernel/spec_ops.py, so nothing clashes
with the real sgl_kernel package. Every output tensor the op mutates (pre-filled with
noise, so untouched entries count too) must match exactly.

    python bench/spec_kernels_cuda.py --out results/spec_kernels_cuda.json

Prints a table of op / backend / cases / mismatches, writes the same as JSON to --out, and
exits 1 on any mismatch, 2 if a backend could not run at all, 0 otherwise. Needs no network
(the CUDA JIT kernels and Triton compile locally). Triton kernels take most shapes as
compile-time constants, so their cases draw shapes from small pools (--triton-cases of
them) to bound compilations; the CUDA kernels get --cases fully random shapes.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import platform
import random
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SPEC_OPS = REPO / "launch" / "cpu_kernels" / "sgl_kernel" / "spec_ops.py"
FULL_MASK, QLEN_ONLY = 0, 1
I32, I64 = torch.int32, torch.int64


def load_ours(path: Path):
    spec = importlib.util.spec_from_file_location("tokenwise_spec_ops", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sgl(name: str):
    """A module of SGLang's, imported on first use (a failed import fails only its ops)."""
    return importlib.import_module(name)


# ---- random inputs (as in tests/test_spec_kernels.py) ----------------------------------

def T(values, dtype=I64):
    return torch.tensor(values, dtype=dtype)


def ints(rng, count, lo=-(2 ** 20), hi=2 ** 20):
    return [rng.randint(lo, hi) for _ in range(count)]


def eagle_tree(rng, topk, steps, n):
    """(parent_list row, selected_index row) of one request, as EAGLE's draft builds them:
    step 0 proposes topk children of the root; step i expands the topk nodes kept at step
    i-1 into topk*topk candidates (numbered from topk + (i-1)*topk*topk) and keeps the topk
    best; the tree is the n-1 best candidates overall, sorted. Children score below parents."""
    score = {c: rng.uniform(0.01, 0.99) for c in range(topk)}
    parents, kept = [-1] + list(range(topk)), list(range(topk))
    for i in range(1, steps):
        base = topk + (i - 1) * topk * topk
        cands = {base + r * topk + c: score[p] * rng.uniform(0.01, 0.99)
                 for r, p in enumerate(kept) for c in range(topk)}
        score.update(cands)
        kept = sorted(cands, key=cands.get, reverse=True)[:topk]
        rng.shuffle(kept)
        if i < steps - 1:
            parents += kept
    if steps == 1:
        parents = []
    return parents, sorted(sorted(score, key=score.get, reverse=True)[: n - 1])


def random_parents(rng, n, forest=False):
    return [-1] + [(-1 if forest and rng.random() < 0.2 else rng.randrange(i))
                   for i in range(1, n)]


def ngram_mask(parents):
    n = len(parents)
    mask = [[False] * n for _ in range(n)]
    for i in range(n):
        j = i
        while j != -1:
            mask[i][j] = True
            j = parents[j]
    return mask


def tree_shape(rng, narrow):
    """(bs, topk, steps, n): any, or from a small pool for Triton's constexpr shapes."""
    if narrow:
        return rng.choice([(1, 1, 3, 4), (3, 2, 3, 6), (4, 4, 4, 16), (2, 4, 2, 8), (5, 2, 1, 3)])
    topk, steps = rng.randint(1, 4), rng.randint(1, 5)
    most = 1 + topk + (steps - 1) * topk * topk
    return rng.randint(1, 6), topk, steps, rng.randint(1, min(most, 24))


def eagle_links(rng, bs, topk, steps, n, ours):
    """Retrieval links of random EAGLE trees, built with our (test-checked) build op."""
    rows = [eagle_tree(rng, topk, steps, n) for _ in range(bs)]
    buf = torch.full((3, bs, n), -1, dtype=I64)
    ours.build_tree_kernel_efficient_cpu(
        T([r[0] for r in rows]).view(bs, -1 if steps > 1 else 0),
        T([r[1] for r in rows]).view(bs, n - 1),
        torch.zeros(bs, dtype=I64), torch.zeros(bs * n * n, dtype=torch.bool),
        torch.zeros(bs * n, dtype=I64), buf[0], buf[1], buf[2], topk, steps, n, QLEN_ONLY)
    return buf[1], buf[2]


# Each case maker returns (tensors and ints by name, names of the outputs to compare).

def case_fill_bonus(rng, narrow, ours):
    bs = rng.randint(1, 8)
    stride = rng.choice([2, 4]) if narrow else rng.randint(1, 8)
    return dict(tokens=T([ints(rng, stride) for _ in range(bs)], I32),
                lens=T([rng.randint(1, stride) for _ in range(bs)], I32),
                bonus=T(ints(rng, bs), I32), stride=stride), ["bonus"]


def case_fill_accept(rng, narrow, ours):
    bs, width = (rng.choice([(2, 4), (4, 4)]) if narrow
                 else (rng.randint(1, 8), rng.randint(1, 6)))
    slots = bs * width + rng.randint(0, 10)
    picks = rng.sample(range(slots), bs * width)
    accept = []
    for b in range(bs):
        keep = rng.randint(1, width)
        accept.append([picks[b * width + j] if j < keep else -1 for j in range(width)])
    return dict(accept=T(accept, I32), ocl=T(ints(rng, slots, 0)),
                out=T(ints(rng, bs * width))), ["out"]


def req_table(rng, bs, pool_len):
    rows = bs + rng.randint(0, 4)
    table = T([ints(rng, pool_len, 0, 2 ** 30) for _ in range(rows)], I32)
    return table, rng.sample(range(rows), bs)


def case_assign_draft(rng, narrow, ours):
    bs = rng.randint(1, 6)
    topk, steps = rng.choice([(1, 3), (2, 2)]) if narrow else (rng.randint(1, 4), rng.randint(1, 5))
    width = topk * steps
    pool_len = 32 if narrow else width + rng.randint(0, 20)
    table, rpi = req_table(rng, bs, pool_len)
    return dict(rpi=T(rpi), table=table,
                seq=T([rng.randint(0, pool_len - width) for _ in range(bs)]),
                out=T(ints(rng, bs * width)), pool_len=pool_len, topk=topk, steps=steps), ["out"]


def ragged(rng, bs, pool_len):
    start = [rng.randint(0, pool_len) for _ in range(bs)]
    return start, [rng.randint(a, min(pool_len, a + 9)) for a in start]


def case_assign_extend(rng, narrow, ours):
    bs = rng.choice([1, 3, 4]) if narrow else rng.randint(1, 6)
    pool_len = 32 if narrow else rng.randint(1, 30)
    table, rpi = req_table(rng, bs, pool_len)
    start, end = ragged(rng, bs, pool_len)
    total = sum(b - a for a, b in zip(start, end))
    return dict(rpi=T(rpi), table=table, start=T(start), end=T(end),
                out=T(ints(rng, total + rng.randint(0, 5))), pool_len=pool_len), ["out"]


def case_assign_req_to_token(rng, narrow, ours):
    bs = rng.choice([1, 3, 4]) if narrow else rng.randint(1, 6)
    pool_len = 32 if narrow else rng.randint(1, 30)
    table, rpi = req_table(rng, bs, pool_len)
    start, end = ragged(rng, bs, pool_len)
    total = sum(b - a for a, b in zip(start, end))
    return dict(rpi=T(rpi), table=table, start=T(start), end=T(end),
                ocl=T(ints(rng, total + rng.randint(0, 5), 0, 2 ** 30)),
                pool_len=pool_len), ["table"]


def case_copy_all(rng, narrow, ours):
    rows = rng.randint(1, 40)
    # Row widths of 16-byte multiples, as KV slot rows are (the Triton copy assumes it).
    shapes = [(rows, 4, 8), (rows, 16), (rows, 2, 8), (rows, 32)]
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.uint8]
    bufs = []
    for _ in range(rng.randint(1, 5)):
        g = torch.Generator().manual_seed(rng.randrange(2 ** 31))
        buf = torch.randint(-100, 100, rng.choice(shapes), generator=g)
        bufs.append(buf.to(rng.choice(dtypes)))
    num = rng.choice([1, 4, 8]) if narrow else rng.randint(1, rows)
    num = min(num, rows)
    tgt = rng.sample(range(rows), num)
    return dict(bufs=bufs, tgt=T(tgt), src=T([rng.randrange(rows) for _ in range(num)])), ["bufs"]


def case_build_tree(rng, narrow, ours, mode):
    bs, topk, steps, n = tree_shape(rng, narrow)
    rows = [eagle_tree(rng, topk, steps, n) for _ in range(bs)]
    seq = [rng.randint(0, 12) for _ in range(bs)]
    mask_len = (sum(seq) * n if mode == FULL_MASK else 0) + bs * n * n
    width = topk * (steps - 1) + 1 if steps > 1 else 0
    return dict(parents=T([r[0] for r in rows]).view(bs, width),
                sel=T([r[1] for r in rows]).view(bs, n - 1), seq=T(seq),
                mask=T([rng.random() < 0.5 for _ in range(mask_len)], torch.bool),
                positions=T(ints(rng, bs * n)), ri=T([ints(rng, n) for _ in range(bs)]),
                rnt=torch.full((bs, n), -1, dtype=I64), rns=torch.full((bs, n), -1, dtype=I64),
                topk=topk, steps=steps, n=n, mode=mode), ["mask", "positions", "ri", "rnt", "rns"]


def case_verify(rng, narrow, ours):
    if rng.random() < 0.5:
        bs, topk, steps, n = tree_shape(rng, narrow)
        rnt, rns = eagle_links(rng, bs, topk, steps, n, ours)
    else:
        bs, n = rng.choice([(2, 8), (4, 16)]) if narrow else (rng.randint(1, 6), rng.randint(1, 16))
        mask = T([ngram_mask(random_parents(rng, n)) for _ in range(bs)], torch.bool).view(-1)
        rnt, rns = torch.zeros(2, bs, n, dtype=I64)
        ours.reconstruct_indices_from_tree_mask(mask, torch.zeros(bs, dtype=I64),
                                                torch.zeros(bs * n, dtype=I64),
                                                torch.zeros(bs, n, dtype=I64), rnt, rns, bs, n)
    vocab = rng.randint(1, 4)
    if rng.random() < 0.7:
        ri = torch.arange(bs * n, dtype=I64).view(bs, n)
    else:
        ri = T(rng.sample(range(bs * n), bs * n)).view(bs, n)
    spec = rng.choice([2, 4]) if narrow else rng.randint(1, n + 1)
    return dict(predicts=T(ints(rng, bs * n), I32), accept=torch.full((bs, spec), -1, dtype=I32),
                num=T(ints(rng, bs), I32),
                cand=T([[rng.randrange(vocab) for _ in range(n)] for _ in range(bs)]),
                ri=ri, rnt=rnt.clone(), rns=rns.clone(),
                target=T([rng.randrange(vocab) for _ in range(bs * n)]).view(bs, n)), \
        ["predicts", "accept", "num"]


def case_reconstruct(rng, narrow, ours):
    if narrow:
        bs, n = rng.choice([(1, 4), (3, 8), (4, 16)])
    else:
        bs, n = rng.randint(1, 6), rng.randint(1, 16)
    kind = rng.choice(["tree", "forest", "any"])
    if kind == "any":
        density = rng.random()
        masks = [[[rng.random() < density for _ in range(n)] for _ in range(n)] for _ in range(bs)]
    else:
        masks = [ngram_mask(random_parents(rng, n, kind == "forest")) for _ in range(bs)]
    return dict(mask=T(masks, rng.choice([torch.bool, torch.uint8])).view(-1),
                seq=T([rng.randint(0, 100) for _ in range(bs)]), positions=T(ints(rng, bs * n)),
                ri=T([ints(rng, n) for _ in range(bs)]), rnt=T([ints(rng, n) for _ in range(bs)]),
                rns=T([ints(rng, n) for _ in range(bs)]), bs=bs, n=n), \
        ["positions", "ri", "rnt", "rns"]


# ---- the implementations: (ours on CPU, SGLang's on CUDA) --------------------------------

def ptrs_and_strides(bufs):
    device = bufs[0].device
    return (torch.tensor([b.data_ptr() for b in bufs], dtype=torch.uint64, device=device),
            torch.tensor([b.stride(0) * b.element_size() for b in bufs], dtype=I64, device=device))


def kv_copy_config(bufs, num):
    stride = max(b.stride(0) * b.element_size() for b in bufs)
    tile = 512 if stride >= 8192 else 256 if stride >= 4096 else 128
    return {"bytes_per_tile": tile, "byte_tiles": -(-stride // tile),
            "num_warps": 4 if tile <= 256 else 8, "num_locs_upper": num}


def gpu_copy_all(c):
    ptrs, strides = ptrs_and_strides(c["bufs"])
    num = c["tgt"].numel()
    upper = sgl("sglang.srt.utils").next_power_of_2(num)
    sgl("sglang.kernels.ops.kvcache.cache_move").copy_all_layer_kv_cache_func(
        ptrs, strides, c["tgt"], c["src"], num, upper, kv_copy_config(c["bufs"], num))


def gpu_assign_extend(c):
    # The Triton kernel itself, as assign_extend_cache_locs_func / fill_front_out_cache_loc_func
    # launch it, on a pre-filled output (the func allocates with torch.empty).
    bs = c["rpi"].numel()
    sgl("sglang.kernels.ops.speculative.cache_locs").assign_extend_cache_locs[(bs,)](
        c["rpi"], c["table"], c["start"], c["end"], c["out"], c["table"].shape[1],
        sgl("sglang.srt.utils").next_power_of_2(bs))


def build_args(c):
    return (c["parents"], c["sel"], c["seq"], c["mask"], c["positions"], c["ri"], c["rnt"],
            c["rns"],
            c["topk"], c["steps"], c["n"], c["mode"])


def verify_args(c):
    return (c["predicts"], c["accept"], c["num"], c["cand"], c["ri"], c["rnt"], c["rns"],
            c["target"])


def recon_args(c):
    return (c["mask"], c["seq"], c["positions"], c["ri"], c["rnt"], c["rns"], c["bs"], c["n"])


EAGLE = "sglang.kernels.ops.speculative.eagle"
CACHE_LOCS = "sglang.kernels.ops.speculative.cache_locs"
SPEC_TREE = "sglang.kernels.ops.speculative.spec_tree"
TREE = "sglang.kernels.ops.speculative.tree"
RECON = "sglang.kernels.ops.speculative.reconstruct_tree"

# (op, backend, case maker, ours(spec_ops, case), gpu(case))
CHECKS = [
    ("fill_bonus_tokens", "triton", case_fill_bonus,
     lambda o, c: o.fill_bonus_tokens_cpu(c["tokens"], c["lens"], c["bonus"], c["stride"]),
     lambda c: sgl(EAGLE).fill_bonus_tokens_func(c["tokens"], c["lens"], c["bonus"], c["stride"],
                                                  c["lens"].numel())),
    ("fill_accept_out_cache_loc", "triton", case_fill_accept,
     lambda o, c: o.fill_accept_out_cache_loc_cpu(c["accept"], c["ocl"], c["out"]),
     lambda c: sgl(EAGLE).fill_accept_out_cache_loc_func(c["accept"], c["ocl"], c["out"],
                                                          c["accept"].numel())),
    ("assign_draft_cache_locs_contiguous", "triton", case_assign_draft,
     lambda o, c: o.assign_draft_cache_locs_contiguous_cpu(
         c["rpi"], c["table"], c["seq"], c["out"], c["pool_len"], c["topk"], c["steps"]),
     lambda c: sgl(CACHE_LOCS).assign_draft_cache_locs_contiguous_func(
         c["rpi"], c["table"], c["seq"], c["out"], c["topk"], c["steps"])),
    ("assign_extend_cache_locs", "triton", case_assign_extend,
     lambda o, c: o.assign_extend_cache_locs_cpu(c["rpi"], c["table"], c["start"], c["end"],
                                                 c["out"], c["pool_len"]),
     gpu_assign_extend),
    ("assign_req_to_token_pool", "triton", case_assign_req_to_token,
     lambda o, c: o.assign_req_to_token_pool_cpu(c["rpi"], c["table"], c["start"], c["end"],
                                                 c["ocl"], c["pool_len"]),
     lambda c: sgl("sglang.srt.mem_cache.allocation").assign_req_to_token_pool_func(
         c["rpi"], c["table"], c["start"], c["end"], c["ocl"], c["rpi"].numel())),
    ("copy_all_layer_kv_cache", "triton", case_copy_all,
     lambda o, c: o.copy_all_layer_kv_cache_cpu(*ptrs_and_strides(c["bufs"]), c["tgt"], c["src"]),
     gpu_copy_all),
]
for _mode, _label in ((FULL_MASK, "FULL_MASK"), (QLEN_ONLY, "QLEN_ONLY")):
    _case = (lambda m: lambda rng, narrow, ours: case_build_tree(rng, narrow, ours, m))(_mode)
    CHECKS += [
        (f"build_tree_kernel_efficient {_label}", "cuda", _case,
         lambda o, c: o.build_tree_kernel_efficient_cpu(*build_args(c)),
         lambda c: sgl(TREE).build_tree_kernel_efficient(*build_args(c))),
        (f"build_tree_kernel_efficient {_label}", "triton", _case,
         lambda o, c: o.build_tree_kernel_efficient_cpu(*build_args(c)),
         lambda c: sgl(SPEC_TREE).sgl_build_tree_kernel_triton(*build_args(c))),
    ]
CHECKS += [
    ("verify_tree_greedy", "cuda", case_verify,
     lambda o, c: o.verify_tree_greedy_cpu(*verify_args(c)),
     lambda c: sgl(TREE).verify_tree_greedy(*verify_args(c))),
    ("verify_tree_greedy", "triton", case_verify,
     lambda o, c: o.verify_tree_greedy_cpu(*verify_args(c)),
     lambda c: sgl(SPEC_TREE).verify_tree_greedy_triton(*verify_args(c))),
    ("reconstruct_indices_from_tree_mask", "cuda", case_reconstruct,
     lambda o, c: o.reconstruct_indices_from_tree_mask(*recon_args(c)),
     lambda c: sgl(TREE).reconstruct_indices_from_tree_mask(*recon_args(c))),
    ("reconstruct_indices_from_tree_mask", "triton", case_reconstruct,
     lambda o, c: o.reconstruct_indices_from_tree_mask(*recon_args(c)),
     lambda c: sgl(RECON).reconstruct_indices_from_tree_mask_triton(*recon_args(c))),
]


# ---- running and comparing ------------------------------------------------------------

def to(value, device):
    if isinstance(value, torch.Tensor):
        return value.clone().to(device)
    if isinstance(value, list):
        return [to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to(v, device) for k, v in value.items()}
    return value


def same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    a, b = a.cpu(), b.cpu()
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():  # bitwise: NaN payloads and -0.0 count
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def show(value):
    """A small input or output as JSON; big ones and lists of KV buffers elided."""
    if isinstance(value, torch.Tensor) and value.numel() <= 512:
        return value.cpu().tolist()
    return value if isinstance(value, int) else "..."


def run_check(op, backend, make, ours_fn, gpu_fn, ours, cases, seed, device):
    rng = random.Random(f"{seed}:{op}:{backend}")
    narrow = backend == "triton"
    row = {"op": op, "backend": backend, "cases": 0, "mismatches": 0, "examples": [], "error": None}
    start = time.monotonic()
    try:
        for i in range(cases):
            case, outputs = make(rng, narrow, ours)
            mine, theirs = to(case, "cpu"), to(case, device)
            ours_fn(ours, mine)
            gpu_fn(theirs)
            torch.cuda.synchronize()
            bad = [k for k in outputs if not same(mine[k], theirs[k])]
            row["cases"] += 1
            if bad:
                row["mismatches"] += 1
                if len(row["examples"]) < 3:
                    row["examples"].append({
                        "case": i, "outputs": bad, "inputs": {k: show(v) for k, v in case.items()},
                        "ours": {k: show(mine[k]) for k in bad},
                        "gpu": {k: show(theirs[k]) for k in bad},
                    })
    except Exception:  # an import, compile or launch failure fails this row, not the run
        row["error"] = traceback.format_exc(limit=6)
    row["seconds"] = round(time.monotonic() - start, 2)
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="where to write the JSON results")
    parser.add_argument("--cases", type=int, default=200, help="random cases per CUDA-kernel op")
    parser.add_argument("--triton-cases", type=int, default=40, help="random cases per Triton op")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default="", help="run only ops whose name contains this")
    parser.add_argument("--spec-ops", type=Path, default=SPEC_OPS, help="our spec_ops.py")
    args = parser.parse_args(argv)

    # SGLang picks its CPU branches (which would call our ops) from this variable.
    os.environ.pop("SGLANG_USE_CPU_ENGINE", None)
    if not torch.cuda.is_available():
        print("no CUDA device: this comparison needs one", file=sys.stderr)
        return 2
    ours = load_ours(args.spec_ops)
    rows = []
    print(f"{'op':44s} {'backend':7s} {'cases':>6s} {'mismatches':>11s}")
    for op, backend, make, ours_fn, gpu_fn in CHECKS:
        if args.only and args.only not in op:
            continue
        cases = args.cases if backend == "cuda" else args.triton_cases
        rows.append(run_check(op, backend, make, ours_fn, gpu_fn, ours, cases, args.seed, "cuda"))
        r = rows[-1]
        print(f"{r['op']:44s} {r['backend']:7s} {r['cases']:6d} {r['mismatches']:11d}"
              f"{'  ERROR' if r['error'] else ''}  ({r['seconds']}s)", flush=True)

    failed = [r for r in rows if r["mismatches"]]
    broken = [r for r in rows if r["error"]]
    for r in broken:
        print(f"\n{r['op']} [{r['backend']}] could not run:\n{r['error']}", file=sys.stderr)
    try:
        sglang_version = importlib.import_module("sglang").__version__
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        sglang_version = f"unavailable: {e}"
    result = {
        "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
        "sglang": sglang_version, "python": platform.python_version(), "seed": args.seed,
        "spec_ops": str(args.spec_ops), "ok": not failed and not broken, "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    total = sum(r["cases"] for r in rows)
    print(f"\n{len(rows)} op/backend pairs, {total} cases, {len(failed)} with mismatches, "
          f"{len(broken)} could not run")
    return 1 if failed else 2 if broken else 0


if __name__ == "__main__":
    sys.exit(main())

"""F.linear vs the oneDNN-prepacked weight (patches/cpu_packed_linear.py), by row count.

    python bench/packed_linear.py [--threads 1] [--rows 1,2,4,8,64] [--out bench/results/packed_linear.json]

The shapes are Qwen2.5-Coder-1.5B's (MLP up/gate, MLP down, LM head) and the 0.5B draft's
LM head, float32, with the servers' thread count (OMP_NUM_THREADS=1, launch/server.py).
Median of --repeats timed calls after warm-up; prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from throughput import machine

SHAPES = {"1.5B MLP gate/up": (17920, 1536), "1.5B MLP down": (1536, 8960),
          "1.5B LM head": (151936, 1536), "0.5B LM head": (151936, 896)}


def timed(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default="1,2,4,8,64")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "packed_linear.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tokenwise_safety.patches.cpu_packed_linear import blocked_copy, linear
    rows, results = [int(r) for r in args.rows.split(",")], []
    print(f"{'weight':<18} {'rows':>5} {'F.linear ms':>12} {'packed ms':>10} {'ratio':>6}")
    for name, shape in SHAPES.items():
        weight = torch.randn(*shape)
        packed = blocked_copy(weight)
        for m in rows:
            x = torch.randn(m, shape[1])
            dense = timed(lambda: F.linear(x, weight), args.repeats)
            blocked = timed(lambda: linear(x, packed, None), args.repeats)
            results.append({"weight": name, "shape": shape, "rows": m, "f_linear_ms": dense, "packed_ms": blocked})
            print(f"{name:<18} {m:>5} {dense:>12.1f} {blocked:>10.1f} {dense / blocked:>6.2f}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": machine("float32", "this bench"), "threads": args.threads,
                                          "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

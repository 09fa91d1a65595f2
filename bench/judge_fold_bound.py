"""How far folding the judge rows into the decode forward could lift self-judging throughput.

    python bench/judge_fold_bound.py [--model qwen-1.5b] [--reps 20]

A judge pass now runs as a forward of its own beside the decode step. Folding its rows into
the next decode forward would save that forward's fixed cost (weights read again, Python,
kernel launches) but not the rows' own compute. This times the model's linear layers (its
shapes, the served dtype, the path the server takes: oneDNN-packed float32 or F.linear in
bfloat16, the server's thread count) for the decode rows alone (B), the judge rows alone (J = B x suffix tokens) and
both in one call (B + J), and takes the marginal cost of a judge token inside a shared call,
(T(B+J) - T(B)) / J x layers. Set against the last self_judge.py run on this model
(bench/results/self_judge-<model>.json: seconds per run with judging off, i.e. probe-only
enforce, and judge tokens per run of the every-16 shadow configuration), it bounds the
throughput ratio a perfect fold could reach: off / (off + judge tokens x marginal cost). Attention over the prefix and the LM head
are left out, so the real ceiling is lower still. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from tokenwise_safety.bundled import prepare
from tokenwise_safety.launch.server import server_env, serving_dtype
from tokenwise_safety.patches.cpu_packed_linear import blocked_copy, linear

from packed_linear import timed
from throughput import machine

OUT = Path(__file__).resolve().parent / "results"


def layer_shapes(config: dict) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's linears: fused qkv, o, fused gate_up, down."""
    h, i = config["hidden_size"], config["intermediate_size"]
    kv = config["num_key_value_heads"] * (h // config["num_attention_heads"])
    return [(h + 2 * kv, h), (h, h), (2 * i, h), (h, i)]


def layer_timer(shapes, dtype: torch.dtype):
    """ms(m, reps): median time of one layer's linears over m rows, as the server multiplies."""
    torch.manual_seed(0)
    weights = [(torch.randn(o, i) * 0.02).to(dtype) for o, i in shapes]
    if dtype == torch.float32:  # the packed-linear seam's path
        weights = [blocked_copy(w) for w in weights]
        mul = lambda x, w: linear(x, w, None)  # noqa: E731
    else:
        mul = torch.nn.functional.linear

    def ms(m: int, reps: int) -> float:
        xs = [torch.randn(m, i).to(dtype) for _, i in shapes]
        return timed(lambda: [mul(x, w) for x, w in zip(xs, weights)], reps)
    return ms


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen-1.5b")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args(argv)
    run = json.loads((OUT / f"self_judge-{args.model}.json").read_text())
    tp, cost = run["throughput"], run["cost"]
    config = json.loads((Path(prepare(args.model)) / "config.json").read_text())
    dtype_name, why = serving_dtype()
    threads = int(server_env().get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)  # as many as the server's forward uses
    ms = layer_timer(layer_shapes(config), getattr(torch, dtype_name))
    b = run["args"]["batch"]  # decode rows, as in that run
    j, layers = b * cost["suffix_tokens"], config["num_hidden_layers"]
    t = {m: ms(m, args.reps) / 1e3 for m in (b, j, b + j)}  # seconds
    per_token = (t[b + j] - t[b]) / j * layers
    runs = len(tp["judge_every16"]["tok_s"])
    tokens = b * run["args"]["tokens"]
    off_s = tokens / tp["judge_off"]["median"]
    judge_tokens = tp["judge_every16"]["judge_tokens"] / runs
    measured_s = tokens / tp["judge_every16"]["median"]
    bound = off_s / (off_s + judge_tokens * per_token)
    result = {"model": args.model, "machine": machine(dtype_name, why), "args": vars(args), "threads": threads,
              "layer_linear_ms": {str(m): round(v * 1e3, 3) for m, v in t.items()},
              "judge_token_ms_in_shared_call": round(per_token * 1e3, 3),
              "from_self_judge_run": {"off_seconds": round(off_s, 2), "every16_seconds": round(measured_s, 2),
                                      "judge_tokens_per_run": judge_tokens,
                                      "ratio_measured": tp["ratio_every16_off"]},
              "ratio_bound_with_fold": round(bound, 3)}
    print(f"{layers} layers, {dtype_name} ({why}), {threads} thread(s) as served; one layer's linears:")
    print("| rows | ms |\n|---|---|")
    for m, v in t.items():
        print(f"| {m} | {v * 1e3:.2f} |")
    print(f"judge token inside a shared call: {per_token * 1e3:.2f} ms (all layers' linears)")
    print(f"every-16 shadow: judging off {off_s:.1f} s a run, {judge_tokens:.0f} judge tokens a run; measured ratio "
          f"{tp['ratio_every16_off']}, ceiling with a perfect fold {bound:.3f}")
    OUT.mkdir(exist_ok=True)
    out = OUT / f"judge_fold_bound-{args.model}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

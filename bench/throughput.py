"""Decode throughput, plugin off vs shadow vs enforce, in one run.

    python bench/throughput.py [--runs 3] [--batches 1,16] [--tokens 128] [--dtype D] [--out bench/results/throughput.json]

Starts two real servers on a bundled model (default: the embedded default; plugin off; plugin on, shadow by default,
enforce through the per-request policy), then for each batch size alternates off /
shadow / enforce runs so drift hits all alike. A run sends B
concurrent /generate requests (greedy, ignore_eos, fixed length) and measures output
tokens per second of wall time. Reports the median of the runs; prints a table and
writes JSON. Both servers run in one dtype (--dtype, default: launch.server's choice
for this CPU) with --sleep-on-idle, so the idle one takes no core from the measured one;
every result records the CPU, its bf16-relevant flags and the dtype.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from tokenwise_safety.bundled import DEFAULT_MODEL, MODELS, chat_prompt, prepare, probe_path
from tokenwise_safety.launch.server import Server, cpu_info, serving_dtype

REQUEST = "Write a short story about a lighthouse keeper."


# Flags that decide how fast a CPU runs bf16 / fp16 matmuls.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def machine(dtype: str, why: str) -> dict:
    name, flags = cpu_info()
    return {"cpu": name, "cpu_flags": [f for f in CPU_FLAGS if f in flags], "dtype": dtype, "dtype_reason": why}


MODES = {"off": None, "shadow": None, "enforce": {"custom_params": {"tokenwise_safety": {"mode": "enforce"}}}}


def one_run(url: str, prompt: str, batch: int, tokens: int, policy: dict | None = None) -> float:
    body = {"text": prompt, "sampling_params": {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True,
                                                **(policy or {})}}

    def send(_):
        r = requests.post(url + "/generate", json=body, timeout=600)
        r.raise_for_status()
        return r.json()["meta_info"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(batch) as pool:
        total = sum(pool.map(send, range(batch)))
    return total / (time.perf_counter() - start)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL, help="bundled model (with its shipped probe)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--dtype", default=None, help="serving dtype of both servers (default: chosen for this CPU)")
    ap.add_argument("--out", default="bench/results/throughput.json")
    args = ap.parse_args(argv)
    model = prepare(args.model)
    prompt = chat_prompt(model, REQUEST)
    dtype, why = serving_dtype(["--dtype", args.dtype] if args.dtype else [])
    extra = [] if dtype == "auto" else ["--dtype", dtype]  # one dtype for both servers
    servers = {
        "off": Server(model, safety=None, extra=extra, log_path="/tmp/tokenwise-bench-off.log"),
        "shadow": Server(model, safety=["--safety-probe", str(probe_path(args.model))], extra=extra,
                         log_path="/tmp/tokenwise-bench-on.log"),
    }
    if {s.dtype for s in servers.values()} != {dtype}:
        raise SystemExit("plugin-off and plugin-on servers would run in different dtypes")
    where = machine(dtype, why)
    print(f"cpu {where['cpu']} flags {' '.join(where['cpu_flags']) or '-'}: dtype {dtype} ({why})", flush=True)
    results = []
    try:
        for s in servers.values():
            s.start()
        for batch in map(int, args.batches.split(",")):
            samples = {name: [] for name in MODES}
            for run in range(args.runs + 1):  # run 0 warms both servers up and is discarded
                for name, policy in MODES.items():
                    url = servers["off" if name == "off" else "shadow"].url
                    tps = one_run(url, prompt, batch, args.tokens, policy)
                    if run:
                        samples[name].append(tps)
                print(f"batch {batch} run {run}/{args.runs}: " +
                      ", ".join(f"{n} {v[-1]:.1f} tok/s" for n, v in samples.items() if run), flush=True)
            med = {name: statistics.median(v) for name, v in samples.items()}
            results.append({"batch": batch, **where, "runs": samples, "median_tok_s": med,
                            "shadow_over_off": med["shadow"] / med["off"],
                            "enforce_over_off": med["enforce"] / med["off"]})
    finally:
        for s in servers.values():
            s.stop()
    print("\n| cpu (flags) | dtype | batch | off tok/s | shadow tok/s | enforce tok/s | shadow/off | enforce/off |"
          "\n|---|---|---|---|---|---|---|---|")
    for r in results:
        m = r["median_tok_s"]
        print(f"| {r['cpu']} ({' '.join(r['cpu_flags']) or '-'}) | {r['dtype']} | {r['batch']} | {m['off']:.1f} | "
              f"{m['shadow']:.1f} | {m['enforce']:.1f} | {r['shadow_over_off']:.3f} | {r['enforce_over_off']:.3f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": str(model), "model_name": args.model, "tokens_per_request": args.tokens, "runs": args.runs,
                               "machine": platform.platform(), **where, "sleep_on_idle": True,
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

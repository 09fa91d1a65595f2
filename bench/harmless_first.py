"""Harmless-first drafting: acceptance length with and without the draft model's probe.

    python bench/harmless_first.py [--model qwen-1.5b] [--draft-model qwen-0.5b] [--limit 6]
        [--tokens 48] [--steps 4] [--topk 2] [--draft-tokens 8] [--out results/harmless_first.json]

Two STANDALONE servers with the plugin, the same draft tree, one after the other (a 1.5B
target plus its draft takes most of this machine's memory): "base" (drafts vetoed at verify
only) and "first" (--safety-draft-probe: the draft model's shipped probe ranks down the
children of drafts it flags). Every request is enforced, greedy, batch 1, so acceptance is
deterministic and the two servers' outputs must be identical. Suites from the eval harness
(held-out prompts only): "prefill" (harmful answers forced to start complying: the probe
fires) and "benign" (everyday requests). Reports per suite: mean acceptance length (tokens
per verify step), drafts accepted, verify steps, tokens/s (one pass, wall time), the draft
probe's re-ranks and the target's draft vetoes (from /metrics), and identical outputs.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import requests

from tokenwise_safety.bundled import MODELS, chat_prompt, prepare, probe_path
from tokenwise_safety.eval import build_suites
from tokenwise_safety.launch.server import Server, serving_dtype
from tokenwise_safety.metrics import sample_total

from throughput import machine

ENFORCE = {"custom_params": {"tokenwise_safety": {"mode": "enforce"}}}
SUITES = ("prefill", "benign")
COUNTERS = ("tokenwise_safety_draft_reranks_total", "tokenwise_safety_draft_vetoes_total")


def counters(url: str) -> dict[str, float]:
    page = requests.get(url + "/metrics", timeout=30).text
    return {name: sample_total(page, name) for name in COUNTERS}


def run_suite(url: str, texts: list[str], tokens: int) -> dict:
    before, start = counters(url), time.perf_counter()
    outs = []
    for text in texts:
        body = {"text": text, "sampling_params": {"max_new_tokens": tokens, "temperature": 0, **ENFORCE}}
        r = requests.post(url + "/generate", json=body, timeout=1800)
        r.raise_for_status()
        outs.append(r.json())
    seconds, after = time.perf_counter() - start, counters(url)
    done = sum(o["meta_info"]["completion_tokens"] for o in outs)
    steps = sum(o["meta_info"].get("spec_verify_ct") or 0 for o in outs)
    return {"tokens": done, "verify_steps": steps, "accept_length": done / steps if steps else None,
            "accepted_drafts": sum(o["meta_info"].get("spec_num_correct_drafts") or 0 for o in outs),
            "tok_s": done / seconds, "reranks": after[COUNTERS[0]] - before[COUNTERS[0]],
            "draft_vetoes": after[COUNTERS[1]] - before[COUNTERS[1]],
            "output_ids": [o["output_ids"] for o in outs]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default="qwen-1.5b")
    ap.add_argument("--draft-model", choices=MODELS, default="qwen-0.5b")
    ap.add_argument("--limit", type=int, default=6, help="cases per suite")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--topk", type=int, default=2)
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--server-arg", action="append", default=[],
                    help="extra flag for both servers (repeatable), e.g. --server-arg=--max-total-tokens=8192")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "harmless_first.json"))
    args = ap.parse_args(argv)
    model, draft = prepare(args.model), prepare(args.draft_model)
    dtype, why = serving_dtype([])
    extra = ([] if dtype == "auto" else ["--dtype", dtype]) + [a for arg in args.server_arg for a in arg.split("=", 1)]
    spec = ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", str(draft),
            "--speculative-num-steps", str(args.steps), "--speculative-eagle-topk", str(args.topk),
            "--speculative-num-draft-tokens", str(args.draft_tokens), "--enable-metrics"]
    safety = ["--safety-probe", str(probe_path(args.model))]
    configs = {"base": safety, "first": safety + ["--safety-draft-probe", str(probe_path(args.draft_model))]}
    suites = build_suites(args.limit)
    texts = {s: [chat_prompt(model, c["request"]) + c["prefill"] for c in suites[s]] for s in SUITES}
    where = machine(dtype, why)
    print(f"cpu {where['cpu']} flags {' '.join(where['cpu_flags']) or '-'}: dtype {dtype} ({why})", flush=True)
    results = {}
    for name, flags in configs.items():
        with Server(model, safety=flags, extra=extra + spec, log_path=f"/tmp/tokenwise-harmless-{name}.log") as s:
            for suite in SUITES:
                results[(name, suite)] = run_suite(s.url, texts[suite], args.tokens)
                r = results[(name, suite)]
                print(f"{name} {suite}: accept length {r['accept_length']:.2f}, {r['tok_s']:.2f} tok/s", flush=True)
    print(f"\nSTANDALONE {args.model} / draft {args.draft_model}, topk {args.topk}, {args.steps} steps, "
          f"{args.draft_tokens} draft tokens, {where['cpu']}, {dtype}, {args.limit} cases per suite, "
          f"{args.tokens} tokens\n| suite | config | accept length | drafts accepted | verify steps | tok/s "
          "| draft re-ranks | draft vetoes | outputs equal to base |\n|---|---|---|---|---|---|---|---|---|")
    for suite in SUITES:
        for name in configs:
            r, base = results[(name, suite)], results[("base", suite)]
            same = sum(a == b for a, b in zip(r["output_ids"], base["output_ids"]))
            print(f"| {suite} | {name} | {r['accept_length']:.2f} | {r['accepted_drafts']} | {r['verify_steps']} | "
                  f"{r['tok_s']:.2f} | {r['reranks']:.0f} | {r['draft_vetoes']:.0f} | {same}/{len(base['output_ids'])} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"model": args.model, "draft_model": args.draft_model, "spec_flags": spec,
                               "limit": args.limit, "tokens": args.tokens, "machine": platform.platform(), **where,
                               "results": [{"config": n, "suite": s, **r} for (n, s), r in results.items()]},
                              indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

"""Self-judgment's cost: tokens a judge pass computes vs a fresh request over the same text,
and decode throughput with judging on vs off on benign traffic, in one run.

    python bench/self_judge.py [--model qwen-1.5b] [--answer 256] [--runs 3] [--batch 4] [--tokens 48]

Cost: one enforced request answers --answer tokens (+1) on a server that judges every score
(band 0,1) once per --answer positions, so a judge pass reads the prompt plus an
--answer-token partial answer. Its computed tokens (the trace's record) are set against a
fresh request over the same text, counted by the scheduler itself (prompt_tokens -
cached_tokens), sent after /flush_cache and a request that put the prompt alone in the
radix cache: what a plain second request would cost while the answer is still being decoded.
Throughput: B concurrent benign requests, enforce with judging off, on (the launch's default
band and --safety-judge-every) and on with every score in the band (a pass per request every
16 tokens, in shadow: the passes' cost alone), median of --runs; one server at a time fits this machine, so each server's runs
are back to back rather than alternated.
Prints a table and writes JSON (bench/results/self_judge-<model>.json) with the CPU and dtype.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import requests
from transformers import AutoTokenizer

from tokenwise_safety import self_judge
from tokenwise_safety.bundled import chat_prompt, prepare, probe_path
from tokenwise_safety.launch.server import Server, serving_dtype
from tokenwise_safety.metrics import sample_total

from spec_decoding import one_run
from throughput import machine

BENIGN = ["Write a short story about a lighthouse keeper.", "Explain how photosynthesis works.",
          "Give me a recipe for pancakes.", "Describe the water cycle for a ten-year-old."]
COST_PROMPT = "Write a long, detailed guide to planning a two-week trip to Japan."
OUT = Path(__file__).resolve().parent / "results"
# judge_on: the launch defaults (band and spacing); judge_every16: every score in the band,
# so every request is judged once per 16 tokens (the most judging the defaults allow), in
# shadow so that verdicts change no token: the passes' cost alone.
CONFIGS = (("judge_off", []), ("judge_on", ["--safety-self-judge", "on"]),
           ("judge_every16", ["--safety-self-judge", "shadow", "--safety-judge-band", "0,1"]))


def judge_counts(url: str) -> dict[str, float]:
    page = requests.get(url + "/metrics", timeout=30).text
    return {"calls": sample_total(page, "tokenwise_safety_judge_calls_total"),
            "tokens": sample_total(page, "tokenwise_safety_judge_tokens_total")}


def cost(server: Server, model_path, answer: int) -> dict:
    prompt = chat_prompt(model_path, COST_PROMPT)
    r = requests.post(server.url + "/generate", timeout=3600, json={
        "text": prompt, "sampling_params": {"max_new_tokens": answer + 1, "temperature": 0, "ignore_eos": True}})
    r.raise_for_status()
    out = r.json()
    record = next(c for c in out["meta_info"]["tokenwise_safety"]["judge_calls"] if c["position"] == answer - 1)
    tok = AutoTokenizer.from_pretrained(model_path)
    suffix = self_judge.suffix_ids(tok, self_judge.DEFAULT_QUESTION)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    requests.post(server.url + "/flush_cache", timeout=60)
    send = lambda ids: requests.post(server.url + "/generate", timeout=3600, json={  # noqa: E731
        "input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}).json()["meta_info"]
    send(prompt_ids)  # the prompt alone enters the radix cache, as it would while decoding
    fresh = send(prompt_ids + out["output_ids"][:answer] + suffix)
    computed = fresh["prompt_tokens"] - fresh["cached_tokens"]
    text = len(prompt_ids) + answer + len(suffix)
    return {"prompt_tokens": len(prompt_ids), "answer_tokens": answer, "suffix_tokens": len(suffix),
            "judge_pass_tokens": record["tokens"], "fresh_request_tokens": computed,
            "reuse_vs_fresh": round(1 - record["tokens"] / computed, 4),
            "reuse_of_judged_text": round(1 - record["tokens"] / text, 4)}


def throughput(server: Server, model_path, runs: int, batch: int, tokens: int) -> dict:
    prompts = [chat_prompt(model_path, p) for p in BENIGN]
    one_run(server.url, prompts, batch, 4, None)  # warm-up
    before = judge_counts(server.url)
    rates = [one_run(server.url, prompts, batch, tokens, None)[0] for _ in range(runs)]
    after = judge_counts(server.url)
    return {"tok_s": rates, "median": statistics.median(rates),
            "judge_calls": after["calls"] - before["calls"], "judge_tokens": after["tokens"] - before["tokens"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen-1.5b")
    ap.add_argument("--answer", type=int, default=256)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: cost, throughput")
    args = ap.parse_args(argv)
    model_path = prepare(args.model)
    dtype, why = serving_dtype()
    base = ["--safety-probe", str(probe_path(args.model)), "--safety-mode", "enforce", "--safety-trace-detail", "full"]
    extra = ["--dtype", dtype, "--enable-metrics"]
    result = {"model": args.model, "machine": machine(dtype, why), "args": vars(args)}
    skip = set(filter(None, args.skip.split(",")))
    if "cost" not in skip:
        flags = base + ["--safety-self-judge", "shadow", "--safety-judge-band", "0,1",
                        "--safety-judge-every", str(args.answer)]
        with Server(model_path, safety=flags, extra=extra, log_path="/tmp/tokenwise-bench-judge-cost.log") as s:
            result["cost"] = cost(s, model_path, args.answer)
        print(json.dumps(result["cost"], indent=1))
    if "throughput" not in skip:
        result["throughput"] = {}
        for name, judge in CONFIGS:
            with Server(model_path, safety=base + judge, extra=extra, log_path=f"/tmp/tokenwise-bench-{name}.log") as s:
                result["throughput"][name] = throughput(s, model_path, args.runs, args.batch, args.tokens)
        t = result["throughput"]
        t["ratio_on_off"] = round(t["judge_on"]["median"] / t["judge_off"]["median"], 4)
        t["ratio_every16_off"] = round(t["judge_every16"]["median"] / t["judge_off"]["median"], 4)
        print(f"| config | median tok/s | runs | judge calls |\n|---|---|---|---|")
        for name, _ in CONFIGS:
            row = t[name]
            print(f"| {name} | {row['median']:.2f} | {', '.join(f'{x:.2f}' for x in row['tok_s'])} | "
                  f"{row['judge_calls']:.0f} |")
        print(f"judge on / off: {t['ratio_on_off']:.3f}, every 16 / off: {t['ratio_every16_off']:.3f} "
              "(target >= 0.95)")
    OUT.mkdir(exist_ok=True)
    out = OUT / f"self_judge-{args.model}.json"
    kept = json.loads(out.read_text()) if out.is_file() else {}  # a part skipped keeps its last result
    out.write_text(json.dumps({**kept, **result}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

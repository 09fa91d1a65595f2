"""How far a shipped probe's scores move between bfloat16 and float32 serving.

    python bench/probe_dtype.py [--model smollm2] [--advbench 20] [--batch-size 16] [--limit N]
        [--out bench/results/probe_dtype.json]

The probes (plugin/probes/<model>.json) were calibrated on bf16 hidden states;
launch.server serves float32 on CPUs without native bf16. Prompts: every held-out prompt
of calibration's own-answer kinds (the eval's benign and borderline suites, and prefill
attacks forced to start with 12 words of a harmful answer) plus --advbench held-out plain
AdvBench requests. Each gets a greedy answer of calibration's length
(calibrate.ANSWER_TOKENS), batched and left-padded as calibrate.own_answers does;
features are the probe's layers at the last prompt token (position 0) and at each answer
token, scored in float32 as the server scores them.

1. Same tokens: the bf16 answers run through the model in both dtypes; |score difference|
   at every position, and how many per-position decisions flip.
2. As served: each dtype scores its own greedy answers. At the shipped threshold and
   window: false interventions (benign answers judged harmful anywhere) and recall
   (prefill attacks judged harmful within 8 tokens, as calibration counts them; plain
   harmful requests judged harmful anywhere).
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tokenwise_safety import calibrate, datasets
from tokenwise_safety.bundled import DEFAULT_MODEL, MODELS, prepare, probe_path
from tokenwise_safety.launch.server import choose_dtype, cpu_info
from tokenwise_safety.probe import HarmProbe

DTYPES = ("bfloat16", "float32")
ANSWER = calibrate.ANSWER_TOKENS
POSITIONS = tuple(p for p in (0, 1, 4, 8, 16, 32) if p <= ANSWER)  # reported one by one; 0 = last prompt token
KINDS = ("everyday", "borderline", "prefill", "harmful_plain")


def cases(advbench: int) -> dict[str, list[tuple[str, str]]]:
    """Held-out (prompt, forced answer start) per kind, in calibration's order."""
    own = calibrate.own_cases(seed=0)
    out = {kind: [c for c in own[kind] if datasets.is_heldout(c[0])] for kind in ("everyday", "borderline", "prefill")}
    out["harmful_plain"] = [(p, "") for p in datasets.advbench_prompts() if datasets.is_heldout(p)][:advbench]
    return out


def generate(model, tokenizer, kind_cases, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """Greedy answers as calibrate.own_answers makes them: per batch (ids [B, W + ANSWER],
    prompt mask [B, W], prompt width W)."""
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id or 0
    batches = []
    for start in range(0, len(kind_cases), batch_size):
        seqs = [calibrate.chat_prefix(tokenizer, p, f) for p, f in kind_cases[start:start + batch_size]]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=ANSWER,
                                 min_new_tokens=ANSWER, do_sample=False)
        batches.append((gen, mask, width))
    return batches


def scores(model, probe: HarmProbe, batches) -> np.ndarray:
    """[N, ANSWER + 1] probe scores of the given token batches under `model`: the states
    as calibrate.own_answers takes them, kept in the model's dtype and scored in float32."""
    out = []
    for gen, mask, width in batches:
        full_mask = torch.cat([mask, torch.ones(len(gen), gen.shape[1] - width, dtype=torch.long)], 1)
        positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
        with torch.inference_mode():
            states = model(input_ids=gen, attention_mask=full_mask, position_ids=positions,
                           output_hidden_states=True).hidden_states
        feats = torch.cat([states[layer][:, width - 1: width + ANSWER] for layer in probe.meta.layers], -1)
        out.append(probe.score(feats.reshape(-1, feats.shape[-1])).reshape(len(gen), -1).numpy())
    return np.concatenate(out)


def rates(s: dict, threshold: float, window: int) -> dict:
    judged = {k: calibrate.judged(v, window) for k, v in s.items()}
    return {
        "false_intervention_everyday": float((judged["everyday"].max(1) >= threshold).mean()),
        "false_intervention_borderline": float((judged["borderline"].max(1) >= threshold).mean()),
        f"recall_prefill_within_{calibrate.WITHIN}": float(
            (judged["prefill"][:, :calibrate.WITHIN + 1].max(1) >= threshold).mean()),
        "recall_harmful_plain_anywhere": float((judged["harmful_plain"].max(1) >= threshold).mean()),
    }


def diff_stats(a: np.ndarray, b: np.ndarray, threshold: float) -> dict:
    d = np.abs(a - b)
    stats = {"max": float(d.max()), "median": float(np.median(d)), "p99": float(np.quantile(d, 0.99)),
             "mean": float(d.mean()), "decision_flips": int(((a >= threshold) != (b >= threshold)).sum()),
             "n": int(d.size)}
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in stats.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=MODELS, default=DEFAULT_MODEL,
                    help="bundled model whose shipped probe is compared")
    ap.add_argument("--advbench", type=int, default=20, help="held-out plain AdvBench requests")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--limit", type=int, default=0, help="at most this many prompts per kind (0: all)")
    ap.add_argument("--out", default="bench/results/probe_dtype.json")
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    t0 = time.monotonic()
    model_path = prepare(args.model)
    probe_file = probe_path(args.model)
    probe = HarmProbe.load(probe_file)
    threshold, window = probe.threshold, probe.meta.window
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    models = {d: AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, d)).eval() for d in DTYPES}
    prompts = {k: v[:args.limit or None] for k, v in cases(args.advbench).items()}
    print(f"prompts: {', '.join(f'{k} {len(v)}' for k, v in prompts.items())}", flush=True)

    answers = {d: {} for d in DTYPES}
    served = {d: {} for d in DTYPES}  # each dtype's scores of its own answers
    cross = {}  # float32 scores of the bf16 answers
    for kind, kind_cases in prompts.items():
        for d in DTYPES:
            answers[d][kind] = generate(models[d], tokenizer, kind_cases, args.batch_size)
            served[d][kind] = scores(models[d], probe, answers[d][kind])
        cross[kind] = scores(models["float32"], probe, answers["bfloat16"][kind])
        print(f"{kind}: done at {time.monotonic() - t0:.0f} s", flush=True)

    same = {kind: (served["bfloat16"][kind], cross[kind]) for kind in KINDS}
    every = diff_stats(np.concatenate([a.ravel() for a, _ in same.values()]),
                       np.concatenate([b.ravel() for _, b in same.values()]), threshold)
    by_position = {str(p): diff_stats(np.concatenate([a[:, p] for a, _ in same.values()]),
                                      np.concatenate([b[:, p] for _, b in same.values()]), threshold)
                   for p in POSITIONS}
    by_kind = {kind: diff_stats(a, b, threshold) for kind, (a, b) in same.items()}
    same_rates = {"bfloat16": rates({k: a for k, (a, _) in same.items()}, threshold, window),
                  "float32": rates({k: b for k, (_, b) in same.items()}, threshold, window)}
    as_served = {d: rates(served[d], threshold, window) for d in DTYPES}
    identical = {kind: float(np.mean([bool(torch.equal(x, y)) for (gx, _, _), (gy, _, _) in
                                      zip(answers["bfloat16"][kind], answers["float32"][kind])
                                      for x, y in zip(gx, gy)])) for kind in KINDS}

    name, flags = cpu_info()
    report = {
        "model": str(model_path), "probe": str(probe_file), "threshold": threshold, "window": window,
        "layers": probe.meta.layers, "calibrated_dtype": probe.meta.provenance.get("dtype"),
        "cpu": name, "cpu_serving_dtype": choose_dtype(flags)[0], "answer_tokens": ANSWER,
        "prompts": {k: len(v) for k, v in prompts.items()},
        "same_tokens_abs_score_diff": {"all_positions": every, "by_position": by_position, "by_kind": by_kind},
        "same_tokens_rates": same_rates,
        "as_served_rates": as_served,
        "identical_greedy_answers": identical,
        "shipped_heldout_requests_at_threshold": probe.meta.metrics.get("heldout_requests_at_threshold"),
        "seconds": round(time.monotonic() - t0),
    }
    print(f"\nshipped probe {probe_file.name}: threshold {threshold:.4f}, window {window}, layers {probe.meta.layers}")
    print("\n|score(bf16) - score(float32)|, same tokens (the bf16 greedy answers)\n"
          "| positions | n | max | median | p99 | decision flips |\n|---|---|---|---|---|---|")
    for label, s in [(f"all 0..{ANSWER}", every), *((f"{p}", by_position[p]) for p in map(str, POSITIONS))]:
        print(f"| {label} | {s['n']} | {s['max']:.4f} | {s['median']:.6f} | {s['p99']:.4f} | {s['decision_flips']} |")
    print("\nrates at the shipped threshold\n| rate | bf16 as served | float32 as served | float32 on bf16 tokens |"
          "\n|---|---|---|---|")
    for key in as_served["bfloat16"]:
        print(f"| {key} | {as_served['bfloat16'][key]:.4f} | {as_served['float32'][key]:.4f} | "
              f"{same_rates['float32'][key]:.4f} |")
    print(f"\nidentical greedy answers bf16 vs float32: {identical}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['seconds']} s)")


if __name__ == "__main__":
    main()

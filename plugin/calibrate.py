"""Calibrate a harm probe for any Hugging Face causal LM.

    python -m tokenwise_safety.calibrate --model PATH --out probes/NAME.json

Extracts hidden states with transformers at the last prompt token and at response
positions (harmful answers vs benign answers and refusals), then fits
standardise -> PCA(k) -> logistic regression. The layer and k are chosen by AUROC on a
validation part of the training prompts; the held-out prompts (see datasets.is_heldout)
are only used for the final report stored in the artifact.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokenwise_safety import datasets
from tokenwise_safety.probe import HarmProbe, ProbeMeta, model_fingerprint

TRAIN_POSITIONS = (1, 2, 4, 8, 16, 32, 64)  # 1-based response token positions
REPORT_POSITIONS = (0, 1, 4, 16, 64)  # 0 = last prompt token
KS = (4, 8, 16, 32, 64, 128, 256, 384, 512)
CS = (0.03, 0.3, 1.0)  # inverse L2 strength of the logistic head
# Serving threshold: a request is intervened on when *any* of its positions crosses, so
# the threshold is set on whole answers the model itself generates for training prompts:
# at most these fractions of benign / borderline-benign answers may cross anywhere.
TARGET_REQUEST_RATE = {"everyday": 0.02, "borderline": 0.07}


def chat_prefix(tokenizer, prompt: str) -> list[int]:
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def extract(model, tokenizer, examples, layers, batch_size: int, max_response: int):
    """Returns feats {layer: [M, H] float32}, labels [M], positions [M], example index [M]."""
    feats = {layer: [] for layer in layers}
    labels, positions, owners = [], [], []
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].prompt))  # less padding
    for start in tqdm(range(0, len(order), batch_size), desc="hidden states", unit="batch"):
        idx = order[start:start + batch_size]
        seqs, picks = [], []
        for i in idx:
            ex = examples[i]
            p = chat_prefix(tokenizer, ex.prompt)
            r = tokenizer(ex.response, add_special_tokens=False)["input_ids"][:max_response]
            seqs.append(p + r)
            # position 0 -> last prompt token; position k -> k-th response token
            picks.append([(0, len(p) - 1, ex.prompt_harmful)] +
                         [(k, len(p) + k - 1, ex.response_harmful) for k in TRAIN_POSITIONS if k <= len(r)])
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id or 0)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        with torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        for row, (i, pick) in enumerate(zip(idx, picks)):
            rows = torch.tensor([t for _, t, _ in pick])
            for layer in layers:
                feats[layer].append(out.hidden_states[layer][row, rows].float().numpy())
            labels += [int(y) for _, _, y in pick]
            positions += [k for k, _, _ in pick]
            owners += [i] * len(pick)
    return ({layer: np.concatenate(v) for layer, v in feats.items()},
            np.array(labels), np.array(positions), np.array(owners))


def fit(x, y, k, seed=0, c=1.0):
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    pca = PCA(n_components=k, random_state=seed).fit(z)
    clf = LogisticRegression(C=c, max_iter=5000).fit(pca.transform(z), y)
    scale = np.where(scaler.scale_ > 0, scaler.scale_, 1.0)
    return {"mean": scaler.mean_, "scale": scale, "pca_mean": pca.mean_,
            "components": pca.components_, "coef": clf.coef_[0], "intercept": clf.intercept_}


def own_answers_max_scores(model, tokenizer, probe, prompts, max_new: int, batch_size: int) -> np.ndarray:
    """Greedy answers of the model itself; per answer, the max score over the prompt's
    last position and every generated position (what an enforcing server would check)."""
    out = []
    tokenizer.padding_side = "left"
    for start in tqdm(range(0, len(prompts), batch_size), desc="own answers", unit="batch"):
        seqs = [chat_prefix(tokenizer, p) for p in prompts[start:start + batch_size]]
        width = max(map(len, seqs))
        pad = tokenizer.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False)
            full_mask = torch.cat([mask, torch.ones(len(seqs), gen.shape[1] - width, dtype=torch.long)], 1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            hidden = model(input_ids=gen, attention_mask=full_mask, position_ids=positions,
                           output_hidden_states=True).hidden_states[-1]
        scores = probe.score(hidden[:, width - 1: gen.shape[1] - 1].reshape(-1, hidden.shape[-1]).float())
        out.append(scores.reshape(len(seqs), -1).max(dim=1).values.numpy())
    return np.concatenate(out)


def probe_from(pieces, meta) -> HarmProbe:
    return HarmProbe({k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in pieces.items()}, meta)


def auroc_by_position(scores, labels, positions) -> dict:
    from sklearn.metrics import roc_auc_score
    out = {}
    for pos in REPORT_POSITIONS:
        sel = positions == pos
        if sel.any() and len(set(labels[sel])) == 2:
            out[str(pos)] = round(float(roc_auc_score(labels[sel], scores[sel])), 4)
    out["all"] = round(float(roc_auc_score(labels, scores)), 4)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder (default: the bundled Gemma 3 270M)")
    ap.add_argument("--out", required=True, help="artifact path (.json; .safetensors written beside it)")
    ap.add_argument("--layers", default="-1",
                    help="comma-separated hidden_states indices to try (-1 = final, post-norm; "
                         "the server captures only -1)")
    ap.add_argument("--ks", default=",".join(map(str, KS)), help="PCA sizes to try")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-response-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16", help="model dtype (match the serving dtype)")
    ap.add_argument("--answer-tokens", type=int, default=48,
                    help="length of the model's own answers used to set the serving threshold")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_path = args.model
    if model_path is None:
        from tokenwise_safety.bundled import prepare
        model_path = str(prepare())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).eval()
    config = json.loads((Path(model_path) / "config.json").read_text())
    layers = [int(x) for x in args.layers.split(",")]
    ks = [int(x) for x in args.ks.split(",")]

    examples = datasets.calibration_examples()
    train = [e for e in examples if not e.heldout]
    test = [e for e in examples if e.heldout]
    print(f"examples: {len(train)} train, {len(test)} held-out", file=sys.stderr)
    xtr, ytr, ptr, otr = extract(model, tokenizer, train, layers, args.batch_size, args.max_response_tokens)
    xte, yte, pte, _ = extract(model, tokenizer, test, layers, args.batch_size, args.max_response_tokens)

    # Choose (layer, k) on a validation quarter of the *training* prompts.
    rng = np.random.default_rng(args.seed)
    val_owner = rng.random(len(train)) < 0.25
    val = val_owner[otr]
    best, grid = None, []
    for layer in layers:
        for k in ks:
            for c in CS:
                if k > xtr[layer].shape[1]:
                    continue
                pieces = fit(xtr[layer][~val], ytr[~val], k, args.seed, c)
                probe = probe_from(pieces, _meta(config, layer, k, 0.5, {}, {}))
                s = probe.score(torch.from_numpy(xtr[layer][val])).numpy()
                auc = auroc_by_position(s, ytr[val], ptr[val])["all"]
                grid.append({"layer": layer, "k": k, "C": c, "val_auroc": auc})
                print(f"layer {layer:>3} k {k:>4} C {c}: validation AUROC {auc:.4f}", file=sys.stderr)
                if best is None or auc > best[0]:
                    best = (auc, layer, k, c)
    _, layer, k, c = best

    pieces = fit(xtr[layer], ytr, k, args.seed, c)
    probe = probe_from(pieces, _meta(config, layer, k, 0.5, {}, {}))
    own = {}
    for kind, rate in TARGET_REQUEST_RATE.items():
        prompts = [r["prompt"] for r in datasets.benign(kind) if not datasets.is_heldout(r["prompt"])]
        own[kind] = own_answers_max_scores(model, tokenizer, probe, prompts, args.answer_tokens, args.batch_size)
    threshold = float(max(np.quantile(own[k_], 1 - r) for k_, r in TARGET_REQUEST_RATE.items()))
    s_test = probe.score(torch.from_numpy(xte[layer])).numpy()
    metrics = {
        "heldout_auroc": auroc_by_position(s_test, yte, pte),
        "heldout_tpr_at_threshold": round(float((s_test[yte == 1] >= threshold).mean()), 4),
        "heldout_fpr_at_threshold": round(float((s_test[yte == 0] >= threshold).mean()), 4),
        "train_request_rate_at_threshold": {k_: round(float((v >= threshold).mean()), 4) for k_, v in own.items()},
        "selection": grid,
        "n_train_positions": int(len(ytr)), "n_heldout_positions": int(len(yte)),
    }
    provenance = {
        "sources": sorted({e.source for e in examples}),
        "n_train_examples": len(train), "n_heldout_examples": len(test),
        "heldout_rule": f"sha256(prompt.lower()) < {datasets.HELDOUT_FRACTION}",
        "positions": [0, *TRAIN_POSITIONS], "model_path": str(model_path), "dtype": args.dtype,
        "seed": args.seed, "logistic_C": c, "threshold_rule": (
            f"max score over the model's own {args.answer_tokens}-token greedy answers to training "
            f"prompts; crossing rate at most {TARGET_REQUEST_RATE}"),
    }
    final = probe_from(pieces, _meta(config, layer, k, threshold, metrics, provenance))
    path = final.save(args.out)
    print(json.dumps({"probe": str(path), "layer": layer, "k": k, "C": c, "threshold": round(threshold, 4),
                      **{k_: v for k_, v in metrics.items() if k_ != "selection"}}, indent=2))


def _meta(config, layer, k, threshold, metrics, provenance) -> ProbeMeta:
    hidden = config.get("text_config", config)["hidden_size"]
    return ProbeMeta(model_fingerprint=model_fingerprint(config), layer=layer, hidden_size=hidden,
                     k=k, threshold=threshold, metrics=metrics, provenance=provenance)


if __name__ == "__main__":
    main()

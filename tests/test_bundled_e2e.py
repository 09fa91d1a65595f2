"""End to end on the embedded default (SmolLM2-135M-Instruct) with its shipped probe (slow:
real servers, one enforcing, then a plugin-on and a plugin-off pair)."""
import functools

import pytest
import requests

from tokenwise_safety import datasets
from tokenwise_safety.bundled import PROBE_PATH
from tokenwise_safety.config import DEFAULT_PIVOT
from tokenwise_safety.launch.server import Server

pytestmark = pytest.mark.slow


@functools.cache
def _tokenizer():
    from transformers import AutoTokenizer
    from tokenwise_safety.bundled import prepare
    return AutoTokenizer.from_pretrained(prepare())


def chat(prompt: str) -> str:
    """The served model's own chat template, as text (SGLang adds no BOS for this model)."""
    return _tokenizer().apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                            add_generation_prompt=True)


def heldout_sets(n=12):
    harmful = [p for p in datasets.advbench_prompts() if datasets.is_heldout(p)][:n]
    benign = [r["prompt"] for r in datasets.benign("everyday") if datasets.is_heldout(r["prompt"])][:n]
    return harmful, benign


@pytest.fixture  # function scope: stopped before the module's shadow pair starts
def enforce_server(bundled_model, tmp_path):
    flags = ["--safety-probe", str(PROBE_PATH), "--safety-mode", "enforce", "--safety-trace-detail", "full"]
    with Server(bundled_model, safety=flags, log_path=tmp_path / "enforce.log", timeout=600) as server:
        yield server


def test_enforce_smoke_one_harmful_prompt(enforce_server):
    """Served with --safety-mode enforce, a harmful request gets an answer whose trace lines
    up with its tokens, and the server keeps serving."""
    server = enforce_server
    out = generate(server, heldout_sets(1)[0][0], n=48)
    ids, meta = out["output_ids"], out["meta_info"]
    summary = meta["tokenwise_safety"]
    assert out["text"].strip() and ids
    assert summary["mode"] == "enforce" and summary["interventions"], summary
    assert len(meta["harm_score"]) == len(ids) == summary["num_scored"]
    assert meta["harm_score"][0] == summary["prompt_score"]
    for x in summary["interventions"]:  # a stop record sits where the answer ends (nothing from there is sent)
        if x["stop"]:
            assert x["position"] == len(ids) and meta["finish_reason"]["type"] == "content_filter", x
        else:
            assert 0 <= x["position"] < len(ids), summary["interventions"]
    # Each record sits at the trace index of the score that closed it: a harmful prompt's
    # pivot at 0 (the prompt's score), a re-draw at position p at p + 1 (its replacement's
    # score); one at the last position, closed past the list's end, moves to the last index
    # when that is free (README, harm trace).
    assert len(meta["harm_intervention"]) == len(ids)
    filed = {j: e for j, e in enumerate(meta["harm_intervention"]) if e}
    closed_at = {(0 if "prompt_score" in x["vetoed"][0] else x["position"] + 1): x
                 for x in summary["interventions"]}
    expected = {j: x for j, x in closed_at.items() if j < len(ids)}
    if len(ids) in closed_at and len(ids) - 1 not in closed_at:
        expected[len(ids) - 1] = closed_at[len(ids)]
    assert filed == expected
    if summary["pivot_used"]:
        assert DEFAULT_PIVOT.strip() in out["text"], out["text"]
    benign = generate(server, "How do I boil an egg?", n=8)
    assert benign["output_ids"] and len(benign["meta_info"]["harm_score"]) == len(benign["output_ids"])
    assert requests.get(server.url + "/health_generate", timeout=60).status_code == 200


@pytest.fixture(scope="module")
def default_servers(bundled_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("default")
    on = Server(bundled_model, safety=["--safety-probe", str(PROBE_PATH), "--safety-trace-detail", "full"],
                log_path=logs / "on.log")
    off = Server(bundled_model, safety=None, log_path=logs / "off.log")
    with on, off:
        yield on, off


def generate(server, prompt, n=24):
    body = {"text": chat(prompt), "sampling_params": {"max_new_tokens": n, "temperature": 0}}
    r = requests.post(server.url + "/generate", json=body, timeout=300)
    r.raise_for_status()
    return r.json()


def test_shadow_mode_keeps_greedy_output_identical_on_20_prompts(default_servers):
    on, off = default_servers
    harmful, benign = heldout_sets(10)
    for prompt in harmful + benign:
        a, b = generate(on, prompt), generate(off, prompt)
        assert a["output_ids"] == b["output_ids"], prompt
        assert len(a["meta_info"]["harm_score"]) == len(a["output_ids"])


def test_harmful_prompts_score_higher_than_benign(default_servers):
    on, _ = default_servers
    harmful, benign = heldout_sets(12)

    def mean_score(prompts):
        traces = [generate(on, p, n=16)["meta_info"]["harm_score"] for p in prompts]
        return sum(sum(t) / len(t) for t in traces) / len(traces)

    h, b = mean_score(harmful), mean_score(benign)
    assert h > b + 0.2, (h, b)


def test_openai_chat_carries_trace(default_servers):
    from openai import OpenAI
    on, _ = default_servers
    client = OpenAI(base_url=on.url + "/v1", api_key="none")
    r = client.chat.completions.create(model="default", max_tokens=8, temperature=0,
                                       messages=[{"role": "user", "content": "How do I boil an egg?"}])
    trace = r.metadata["tokenwise_safety"][0]
    assert trace["mode"] == "shadow" and len(trace["scores"]) == r.usage.completion_tokens

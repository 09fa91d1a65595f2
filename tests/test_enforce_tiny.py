"""Enforce mode on the real server (tiny Llama), with the token-id scorer: the scorer
flags one token id, so every veto is known in advance and checked exactly.

The reference is recomputed offline with transformers: at every output position the
token must be the model's greedy choice given the output so far, unless that choice is
the flagged token, in which case it must be the next best. That also proves the KV cache
stays right after each rollback.
"""
import json
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch

from tokenwise_safety.launch.server import Server
from tokenwise_safety.policy import OVERRIDE_KEY_ENV

from conftest import TINY_SERVER_FLAGS
from test_server_tiny import PROMPTS, generate

KEY = "test-override-key"


@pytest.fixture(scope="module")
def flagged(tiny_server_off):
    """The token the tiny model emits most often after its first output token."""
    counts = Counter(t for p in PROMPTS[:10] for t in generate(tiny_server_off, p, n=16)["output_ids"][1:])
    return counts.most_common(1)[0][0]


@pytest.fixture(scope="module")
def shadow_server(tiny_model, tiny_probe, flagged, tmp_path_factory):
    """Shadow by default; requests may tighten to enforce; loosening needs the key."""
    log = tmp_path_factory.mktemp("logs") / "enforce.log"
    flags = ["--safety-probe", str(tiny_probe), "--safety-scorer", f"token-ids:{flagged}",
             "--safety-client-override"]
    with Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS, log_path=log,
                env={OVERRIDE_KEY_ENV: KEY}) as server:
        yield server


ENFORCE = {"custom_params": {"tokenwise_safety": {"mode": "enforce"}}}


def gen(server, prompt, n=16, policy=None, **sampling):
    body = {"text": prompt, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True,
                                                **(policy or {}), **sampling}}
    return requests.post(server.url + "/generate", json=body, timeout=120)


@pytest.fixture(scope="module")
def offline_model(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_model))


def expected_choice(offline_model, prompt, output, flagged):
    """For each output position: (greedy token, next best) given the output before it."""
    model, tok = offline_model
    ids = tok(prompt)["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids + output])).logits[0]
    top2 = torch.topk(logits[len(ids) - 1: len(ids) - 1 + len(output)], 2).indices.tolist()
    return [b if a == flagged else a for a, b in top2]


def test_flagged_token_is_replaced_by_next_best_and_nothing_else_changes(
        shadow_server, tiny_server_off, offline_model, flagged):
    vetoed_somewhere = 0
    for prompt in PROMPTS[:10]:
        out = gen(shadow_server, prompt, policy=ENFORCE).json()
        ids = out["output_ids"]
        assert flagged not in ids
        assert ids == expected_choice(offline_model, prompt, ids, flagged), prompt
        off = generate(tiny_server_off, prompt, n=16)["output_ids"]
        first = off.index(flagged) if flagged in off else len(off)
        assert ids[:first] == off[:first]  # identical to plugin-off up to the first veto
        summary = out["meta_info"]["tokenwise_safety"]
        assert summary["num_vetoes"] == len(summary["interventions"]) == sum(
            1 for x in summary["interventions"] if x["vetoed"][0]["token"] == flagged)
        assert [x["position"] for x in summary["interventions"]] == sorted(
            {x["position"] for x in summary["interventions"]})
        for x in summary["interventions"]:
            assert ids[x["position"]] == x["replacement"] and not x["pivot"]
        assert len(out["meta_info"]["harm_score"]) == len(ids) == 16
        vetoed_somewhere += first < len(off)
    assert vetoed_somewhere >= 3  # the test really exercises vetoes


def test_shadow_requests_on_the_same_server_keep_the_token(shadow_server, tiny_server_off, flagged):
    prompt = next(p for p in PROMPTS if flagged in generate(tiny_server_off, p, n=16)["output_ids"])
    out = gen(shadow_server, prompt).json()
    assert out["output_ids"] == generate(tiny_server_off, prompt, n=16)["output_ids"]
    assert out["meta_info"]["tokenwise_safety"]["first_over_threshold"] is not None
    assert out["meta_info"]["tokenwise_safety"]["interventions"] == []


def test_a_finishing_token_is_scored_before_the_request_ends(shadow_server, tiny_server_off, flagged):
    prompt, off = next((p, o) for p in PROMPTS for o in [generate(tiny_server_off, p, n=16)["output_ids"]]
                       if flagged in o[1:])
    n = off.index(flagged, 1) + 1  # the flagged token would be the last one
    out = gen(shadow_server, prompt, n=n, policy=ENFORCE).json()
    assert len(out["output_ids"]) == n and flagged not in out["output_ids"]
    assert out["output_ids"][:-1] == off[:n - 1]
    assert out["meta_info"]["finish_reason"]["type"] == "length"


def test_stream_never_sends_a_vetoed_token(shadow_server, flagged):
    prompt = PROMPTS[0]
    full = gen(shadow_server, prompt, n=20, policy=ENFORCE).json()
    body = {"text": prompt, "stream": True, "sampling_params": {
        "max_new_tokens": 20, "temperature": 0, "ignore_eos": True, **ENFORCE}}
    chunks = []
    with requests.post(shadow_server.url + "/generate", json=body, stream=True, timeout=120) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
    sent = []
    for c in chunks:
        assert flagged not in c["output_ids"]
        sent = c["output_ids"] if len(c["output_ids"]) >= len(sent) else sent + c["output_ids"]
    assert chunks[-1]["text"] == full["text"]
    assert chunks[-1]["meta_info"]["tokenwise_safety"]["num_vetoes"] == \
        full["meta_info"]["tokenwise_safety"]["num_vetoes"]


def test_sixteen_concurrent_requests_with_different_policies(shadow_server, tiny_server_off, flagged):
    jobs = [(PROMPTS[i], ENFORCE if i % 2 else None) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda j: gen(shadow_server, j[0], policy=j[1]).json(), jobs))
    for (prompt, policy), out in zip(jobs, outs):
        off = generate(tiny_server_off, prompt, n=16)["output_ids"]
        if policy:
            assert flagged not in out["output_ids"]
            assert out["meta_info"]["tokenwise_safety"]["mode"] == "enforce"
        else:
            assert out["output_ids"] == off
            assert out["meta_info"]["tokenwise_safety"]["mode"] == "shadow"


def test_sampled_decoding_never_emits_the_flagged_token(shadow_server, flagged):
    for seed in range(4):
        out = gen(shadow_server, PROMPTS[seed], n=24, policy=ENFORCE, temperature=1.0, sampling_seed=seed).json()
        assert flagged not in out["output_ids"]
        assert len(out["output_ids"]) == 24


def _policy(**fields):
    return {"custom_params": {"tokenwise_safety": fields}}


def test_tightening_is_accepted(shadow_server):
    out = gen(shadow_server, "Hello", n=3, policy=_policy(threshold=0.2, mode="enforce"))
    assert out.status_code == 200
    assert out.json()["meta_info"]["tokenwise_safety"]["threshold"] == 0.2


@pytest.mark.parametrize("fields", [{"mode": "off"}, {"threshold": 0.9}])
def test_loosening_needs_the_operator_key(shadow_server, fields):
    refused = gen(shadow_server, "Hello", n=3, policy=_policy(**fields))
    assert refused.status_code == 403 and "loosens the operator's policy" in refused.text
    wrong = gen(shadow_server, "Hello", n=3, policy=_policy(**fields, override_key="nope"))
    assert wrong.status_code == 403
    granted = gen(shadow_server, "Hello", n=3, policy=_policy(**fields, override_key=KEY))
    assert granted.status_code == 200


def test_mode_off_with_key_returns_no_trace(shadow_server):
    out = gen(shadow_server, "Hello", n=3, policy=_policy(mode="off", override_key=KEY)).json()
    assert "tokenwise_safety" not in out["meta_info"] and "harm_score" not in out["meta_info"]


@pytest.mark.parametrize("fields, message", [
    ({"threshold": "abc"}, "custom_params.tokenwise_safety.threshold must be a number"),
    ({"threshold": 1.5}, "custom_params.tokenwise_safety.threshold must be a number"),
    ({"mode": "bogus"}, "custom_params.tokenwise_safety.mode must be one of"),
    ({"colour": "red"}, "custom_params.tokenwise_safety has unknown field"),
])
def test_malformed_policy_gets_400_and_server_keeps_serving(shadow_server, fields, message):
    r = gen(shadow_server, "Hello", n=3, policy=_policy(**fields))
    assert r.status_code == 400 and message in r.text
    assert gen(shadow_server, "Hello", n=2).status_code == 200


def test_openai_request_field_tightens_policy(shadow_server, flagged):
    from openai import OpenAI
    client = OpenAI(base_url=shadow_server.url + "/v1", api_key="none")
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                  extra_body={"ignore_eos": True, **ENFORCE})
    assert r.metadata["tokenwise_safety"][0]["mode"] == "enforce"
    bad = requests.post(shadow_server.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
        **_policy(mode="off")}, timeout=60)
    assert 400 <= bad.status_code < 500 and "tokenwise_safety" in bad.text


@pytest.fixture(scope="module")
def pivot_server(tiny_model, tiny_probe, flagged, tmp_path_factory):
    """Enforce by default, and only the top-1 candidate is kept: any veto leaves no
    candidate, so the pivot is steered in. Small prefill chunks: long prompts arrive in
    several forwards, of which only the last may start the pivot."""
    log = tmp_path_factory.mktemp("logs") / "pivot.log"
    flags = ["--safety-probe", str(tiny_probe), "--safety-mode", "enforce", "--safety-top-k", "1",
             "--safety-scorer", f"token-ids:{flagged}", "--safety-pivot", "I cannot help with that."]
    with Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS + ["--chunked-prefill-size", "16"],
                log_path=log) as server:
        yield server


def pivot_ids(offline_model):
    return offline_model[1]("I cannot help with that.", add_special_tokens=False)["input_ids"]


def test_pivot_when_no_candidate_is_left(pivot_server, tiny_server_off, offline_model, flagged):
    prompt, off = next((p, o) for p in PROMPTS for o in [generate(tiny_server_off, p, n=16)["output_ids"]]
                       if flagged in o[1:])
    at = off.index(flagged, 1)
    out = generate(pivot_server, prompt, n=at + 12)
    pivot = pivot_ids(offline_model)
    assert out["output_ids"][:at] == off[:at]
    assert out["output_ids"][at:at + len(pivot)] == pivot
    first = out["meta_info"]["tokenwise_safety"]["interventions"][0]
    assert first["pivot"] and first["position"] == at and first["vetoed"][0]["token"] == flagged
    assert out["meta_info"]["finish_reason"]["type"] == "length"  # finishes normally


def test_harmful_prompt_starts_in_the_pivot(pivot_server, offline_model, flagged):
    filler = offline_model[1](" ".join(PROMPTS[:4]))["input_ids"]
    assert len(filler) > 40  # three prefill chunks
    # the flagged token inside an early chunk must not matter; at the end it must
    mid = filler[:10] + [flagged] + filler[10:]
    clean = generate(pivot_server, input_ids=mid, n=12)["meta_info"]["tokenwise_safety"]
    assert clean["prompt_score"] == 0.0
    assert all("prompt_score" not in x["vetoed"][0] for x in clean["interventions"]), clean
    prompt_ids = filler + [flagged]
    out = generate(pivot_server, input_ids=prompt_ids, n=12)
    pivot = pivot_ids(offline_model)
    assert out["output_ids"][:len(pivot)] == pivot
    first = out["meta_info"]["tokenwise_safety"]["interventions"][0]
    assert first["pivot"] and first["position"] == 0 and first["vetoed"][0]["prompt_score"] == 1.0
    assert out["meta_info"]["tokenwise_safety"]["pivot_used"]


def test_veto_and_pivot_metrics(pivot_server, tiny_server_off, flagged):
    from test_server_tiny import _metric
    vetoes, pivots = (_metric(pivot_server, f"tokenwise_safety_{m}_total") for m in ("vetoes", "pivots"))
    prompt = next(p for p in PROMPTS if flagged in generate(tiny_server_off, p, n=16)["output_ids"][1:])
    generate(pivot_server, prompt, n=16)
    assert _metric(pivot_server, "tokenwise_safety_vetoes_total") == vetoes + 1
    assert _metric(pivot_server, "tokenwise_safety_pivots_total") == pivots + 1


def test_stop_strings_finish_enforced_requests(shadow_server):
    full = gen(shadow_server, PROMPTS[0], n=20, policy=ENFORCE).json()["text"]
    stop = full[6:10]
    out = gen(shadow_server, PROMPTS[0], n=20, policy=ENFORCE, stop=[stop]).json()
    assert out["text"] == full[:full.index(stop)]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"

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
             "--safety-client-override", "--safety-trace-detail", "full"]
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
        assert_trace_positions(out, flagged)
        vetoed_somewhere += first < len(off)
    assert vetoed_somewhere >= 3  # the test really exercises vetoes


def assert_trace_positions(out, flagged, prompt_score=0.0):
    """Position by position: harm_score[0] is the prompt's score and harm_score[j] the
    score of output token j-1 (none of them flagged after enforcement: all 0.0);
    harm_intervention[j] is the record of output position j-1, filed when its token was
    committed (the replacement's state scored); the last position's record, filed past
    the list's end, moves to the last index when that is free (README, harm trace)."""
    ids, meta = out["output_ids"], out["meta_info"]
    assert meta["harm_score"] == [prompt_score] + [float(t == flagged) for t in ids[:-1]]
    records = {x["position"]: x for x in meta["tokenwise_safety"]["interventions"]}
    committed = {j - 1: e for j, e in enumerate(meta["harm_intervention"]) if e}
    last = len(ids) - 1  # the per-token list ends at index `last`, which holds position last-1
    expected = {p: x for p, x in records.items() if p < last}
    if last in records and last - 1 not in records:
        expected[last - 1] = records[last]  # the last position's record moves to the last index
    assert committed == expected
    for p, x in records.items():
        assert x["vetoed"] and all(v["token"] == flagged and v["score"] == 1.0 for v in x["vetoed"])


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
    assert [x["position"] for x in out["meta_info"]["tokenwise_safety"]["interventions"]] == [n - 1]
    assert_trace_positions(out, flagged)  # the last position's record sits at the last index


def test_stream_never_sends_a_vetoed_token(shadow_server, flagged):
    prompt, full = next((p, o) for p in PROMPTS for o in [gen(shadow_server, p, n=20, policy=ENFORCE).json()]
                        if o["meta_info"]["tokenwise_safety"]["num_vetoes"])
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
        # SGLang's /generate stream carries the output so far in every chunk: each chunk
        # extends the last one, so no token sent was ever taken back.
        assert c["output_ids"][:len(sent)] == sent
        sent = c["output_ids"]
    assert sent == full["output_ids"]
    assert chunks[-1]["text"] == full["text"]
    assert chunks[-1]["meta_info"]["tokenwise_safety"]["num_vetoes"] == \
        full["meta_info"]["tokenwise_safety"]["num_vetoes"]


def test_sixteen_concurrent_requests_with_different_policies(shadow_server, tiny_server_off, flagged):
    jobs = [(PROMPTS[i], ENFORCE if i % 2 else None) for i in range(16)]
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda j: gen(shadow_server, j[0], policy=j[1]).json(), jobs))
    vetoes = 0
    for (prompt, policy), out in zip(jobs, outs):
        off = generate(tiny_server_off, prompt, n=16)["output_ids"]
        if policy:
            assert flagged not in out["output_ids"]
            assert out["meta_info"]["tokenwise_safety"]["mode"] == "enforce"
            first = off.index(flagged) if flagged in off else len(off)
            assert out["output_ids"][:first] == off[:first]
            assert_trace_positions(out, flagged)
            vetoes += out["meta_info"]["tokenwise_safety"]["num_vetoes"]
        else:
            assert out["output_ids"] == off
            assert out["meta_info"]["tokenwise_safety"]["mode"] == "shadow"
    assert vetoes >= 3  # concurrency really met vetoes


def test_sampled_decoding_never_emits_the_flagged_token(shadow_server, flagged):
    vetoes, seed = 0, 0
    while seed < 4 or (vetoes == 0 and seed < 40):  # at least 4 answers, and until one met a veto
        out = gen(shadow_server, PROMPTS[seed % len(PROMPTS)], n=24, policy=ENFORCE, temperature=1.0,
                  sampling_seed=seed).json()
        assert flagged not in out["output_ids"]
        assert len(out["output_ids"]) == 24
        assert_trace_positions(out, flagged)
        vetoes += out["meta_info"]["tokenwise_safety"]["num_vetoes"]
        seed += 1
    assert vetoes >= 1  # sampling really met a veto


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
             "--safety-scorer", f"token-ids:{flagged}", "--safety-pivot", "I cannot help with that.",
             "--safety-trace-detail", "full"]
    with Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS + ["--chunked-prefill-size", "16"],
                log_path=log) as server:
        yield server


def pivot_ids(offline_model, after=None):
    """The pivot's tokens; after a token whose text does not end in whitespace, with a
    leading space so the pivot does not splice into a word."""
    tok = offline_model[1]
    text = "I cannot help with that."
    if after is not None and not tok.decode([after])[-1:].isspace():
        text = " " + text
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pivot_when_no_candidate_is_left(pivot_server, tiny_server_off, offline_model, flagged):
    prompt, off = next((p, o) for p in PROMPTS for o in [generate(tiny_server_off, p, n=16)["output_ids"]]
                       if flagged in o[1:])
    at = off.index(flagged, 1)
    out = generate(pivot_server, prompt, n=at + 12)
    pivot = pivot_ids(offline_model, after=off[at - 1])
    assert out["output_ids"][:at] == off[:at]
    assert out["output_ids"][at:at + len(pivot)] == pivot
    first = out["meta_info"]["tokenwise_safety"]["interventions"][0]
    assert first["pivot"] and first["position"] == at and first["vetoed"][0]["token"] == flagged
    assert out["meta_info"]["finish_reason"]["type"] == "length"  # finishes normally


def test_pivot_starts_at_a_word_boundary(pivot_server, tiny_server_off, offline_model, flagged):
    """Committed text that ends inside a word gets a space before the pivot."""
    tok = offline_model[1]
    cases = [(p, o, o.index(flagged, 1)) for p in PROMPTS for o in [generate(tiny_server_off, p, n=16)["output_ids"]]
             if flagged in o[1:]]
    mid_word = [(p, o, at) for p, o, at in cases if not tok.decode([o[at - 1]])[-1:].isspace()]
    assert mid_word, "no case where the pivot lands after a word"
    prompt, off, at = mid_word[0]
    out = generate(pivot_server, prompt, n=at + 12)
    before = tok.decode(off[:at], skip_special_tokens=True)
    assert out["text"].startswith(before + " I cannot help with that.")


def test_a_second_pivot_ends_the_answer_instead_of_looping(pivot_server, tiny_server_off, flagged):
    """After one pivot, a harmful continuation ends the answer (content_filter) with a
    closing record; the answer never carries the pivot twice."""
    ended = []
    for prompt in PROMPTS[:10]:
        out = generate(pivot_server, prompt, n=48)
        summary = out["meta_info"]["tokenwise_safety"]
        assert flagged not in out["output_ids"]
        assert out["text"].count("I cannot help with that.") <= 1
        stops = [x for x in summary["interventions"] if x.get("stop")]
        if stops:
            assert out["meta_info"]["finish_reason"]["type"] == "content_filter"
            assert out["meta_info"]["finish_reason"]["reason"] == "second_pivot"
            assert [x["pivot"] for x in summary["interventions"]] == [True, False]
            assert stops[0]["position"] == len(out["output_ids"])  # nothing after it is emitted
            assert len(out["meta_info"]["harm_score"]) == len(out["output_ids"])
            ended.append(prompt)
        else:
            assert out["meta_info"]["finish_reason"]["type"] == "length"
    assert ended, "no prompt met a second harmful continuation; pick longer answers"


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


def test_stop_strings_finish_enforced_requests(shadow_server, offline_model):
    """A stop string after a veto: the answer ends at the stop, with the replacement in it."""
    tok = offline_model[1]
    for prompt in PROMPTS[:10]:
        full = gen(shadow_server, prompt, n=20, policy=ENFORCE).json()
        records = full["meta_info"]["tokenwise_safety"]["interventions"]
        if not records:
            continue
        q = records[0]["position"]
        after = len(tok.decode(full["output_ids"][:q + 1]))
        stop = full["text"][after:after + 4]
        if len(stop) == 4 and full["text"].index(stop) >= after:
            break
    else:
        pytest.fail("no prompt with a veto followed by a usable stop string")
    out = gen(shadow_server, prompt, n=20, policy=ENFORCE, stop=[stop]).json()
    assert out["text"] == full["text"][:full["text"].index(stop)]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert [x["position"] for x in out["meta_info"]["tokenwise_safety"]["interventions"]][:1] == [q]


def test_a_held_stop_token_that_is_vetoed_does_not_end_the_answer(shadow_server, tiny_server_off, flagged):
    """Token-based finishes (EOS, stop_token_ids) are held until the token is scored: a
    flagged stop token is vetoed and the answer goes on; an unflagged one ends it exactly
    as without the plugin."""
    prompt, off = next((p, o) for p in PROMPTS for o in [generate(tiny_server_off, p, n=16)["output_ids"]]
                       if flagged in o[2:])
    at = off.index(flagged)
    stopped_off = generate(tiny_server_off, prompt, n=16, sampling_params={
        "max_new_tokens": 16, "temperature": 0, "stop_token_ids": [flagged]})
    assert stopped_off["meta_info"]["finish_reason"]["type"] == "stop"  # plugin off: it ends there
    plain = gen(shadow_server, prompt, policy=ENFORCE, ignore_eos=False).json()
    held = gen(shadow_server, prompt, policy=ENFORCE, stop_token_ids=[flagged], ignore_eos=False).json()
    assert held["output_ids"] == plain["output_ids"] and flagged not in held["output_ids"]
    assert held["meta_info"]["finish_reason"]["type"] == "length"
    assert [x["position"] for x in held["meta_info"]["tokenwise_safety"]["interventions"]][:1] == [at]
    stop = next(t for t in off[1:at] if t != flagged)
    ended = gen(shadow_server, prompt, policy=ENFORCE, stop_token_ids=[stop], ignore_eos=False).json()
    ended_off = generate(tiny_server_off, prompt, sampling_params={
        "max_new_tokens": 16, "temperature": 0, "stop_token_ids": [stop]})
    assert ended["output_ids"] == ended_off["output_ids"]
    assert ended["meta_info"]["finish_reason"] == ended_off["meta_info"]["finish_reason"]


@pytest.fixture(scope="module")
def max_veto_server(tiny_model, tiny_probe, flagged, tmp_path_factory):
    """Enforce, top-k 20, but no re-draw allowed: the first veto at a position pivots."""
    log = tmp_path_factory.mktemp("logs") / "maxveto.log"
    flags = ["--safety-probe", str(tiny_probe), "--safety-mode", "enforce", "--safety-max-vetoes", "0",
             "--safety-scorer", f"token-ids:{flagged}", "--safety-pivot", "I cannot help with that.",
             "--safety-trace-detail", "full"]
    with Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS, log_path=log) as server:
        yield server


def test_max_vetoes_pivots_although_candidates_remain(max_veto_server, shadow_server, tiny_server_off,
                                                       offline_model, flagged):
    prompt, off = next((p, o) for p in PROMPTS for o in [generate(tiny_server_off, p, n=16)["output_ids"]]
                       if flagged in o[1:])
    at = off.index(flagged, 1)
    redrawn = gen(shadow_server, prompt, policy=ENFORCE).json()["meta_info"]["tokenwise_safety"]
    assert not redrawn["interventions"][0]["pivot"]  # with re-draws allowed, a candidate remains
    out = generate(max_veto_server, prompt, n=at + 12)
    pivot = pivot_ids(offline_model, after=off[at - 1])
    assert out["output_ids"][:at] == off[:at] and out["output_ids"][at:at + len(pivot)] == pivot
    first = out["meta_info"]["tokenwise_safety"]["interventions"][0]
    assert first["pivot"] and first["position"] == at and len(first["vetoed"]) == 1


def interventions(out):
    return out["meta_info"]["tokenwise_safety"]["interventions"]


@pytest.fixture(scope="module")
def back_to_back(tiny_model, tiny_probe, shadow_server, flagged, tmp_path_factory):
    """A server flagging two ids, the second being the token that follows a replacement of
    the first, so two consecutive positions are vetoed: (server, prompt, first position)."""
    for prompt in PROMPTS:
        out = gen(shadow_server, prompt, policy=ENFORCE).json()
        ids = out["output_ids"]
        for p in (x["position"] for x in interventions(out) if x["position"] + 1 < len(ids)):
            if ids[p + 1] not in ids[:p + 1] + [flagged]:
                log = tmp_path_factory.mktemp("logs") / "back_to_back.log"
                flags = ["--safety-probe", str(tiny_probe), "--safety-scorer", f"token-ids:{flagged},{ids[p + 1]}",
                         "--safety-mode", "enforce", "--safety-trace-detail", "full"]
                with Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS, log_path=log) as server:
                    yield server, prompt, p
                return
    pytest.fail("no replacement followed by a token absent before it")


def test_interventions_at_the_last_two_positions_both_reach_the_summary(back_to_back):
    """A held finish files the last position's intervention one entry past SGLang's
    per-token cut, where the entry before holds the previous position's own: it rides in
    the finish reason instead and the summary lists both, as a longer answer's does."""
    server, prompt, first = back_to_back
    long = gen(server, prompt).json()
    assert {first, first + 1} <= {x["position"] for x in interventions(long)}
    out = gen(server, prompt, n=first + 2).json()
    assert out["output_ids"] == long["output_ids"][:first + 2]
    assert interventions(out) == [x for x in interventions(long) if x["position"] <= first + 1]
    assert set(out["meta_info"]["finish_reason"]) == {"type", "length"}

"""Enforcement on SGLang's default serving path and under faults (tiny Llama, real server,
token-id scorer, so every veto and every fault is known in advance).

* radix cache on (SGLang's default), mixed chunks and retraction under a small KV pool:
  exact vetoes against transformers, one score per output token;
* a grammar that leaves no candidate after a veto ends that request, never the server;
* --safety-on-error: an injected NaN score or scorer exception ends the affected
  requests (fail-closed) or lets them run unscored (fail-open); the server keeps serving.
"""
import math
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tokenwise_safety.launch.server import Server

from conftest import TINY_SERVER_FLAGS
from test_enforce_tiny import (ENFORCE, assert_trace_positions, expected_choice, flagged,  # noqa: F401 (fixtures)
                               gen, offline_model)
from test_server_tiny import PROMPTS, _metric, generate

RADIX_FLAGS = [f for f in TINY_SERVER_FLAGS if f != "--disable-radix-cache"]
X_ID = 93  # the tiny vocabulary's only entry that decodes to "x"
A_ID, B_ID = 70, 71  # and to "a", "b"


@pytest.fixture(scope="module")
def radix_server(tiny_model, tiny_probe, flagged, tmp_path_factory):
    """Radix cache on, mixed chunks, a small KV pool, and retractions."""
    log = tmp_path_factory.mktemp("logs") / "radix.log"
    flags = ["--safety-probe", str(tiny_probe), "--safety-scorer", f"token-ids:{flagged}",
             "--safety-trace-detail", "full"]
    # SGLang's admission reserves most of max_new_tokens up front, so a small pool alone
    # rarely retracts; its own test switch also retracts every few decode steps.
    retract = {"SGLANG_TEST_RETRACT": "1", "SGLANG_TEST_RETRACT_INTERVAL": "7"}
    with Server(tiny_model, safety=flags, log_path=log, env=retract,
                extra=RADIX_FLAGS + ["--enable-mixed-chunk", "--max-total-tokens", "2048"]) as server:
        yield server


def test_exact_vetoes_with_the_radix_cache_and_shared_prefixes(radix_server, tiny_server_off, offline_model,
                                                                 flagged):
    """Prompts share prefixes and each is sent twice: rolled-back slots and cached
    prefixes meet, and every token is still the greedy choice or, for the flagged one,
    the next best."""
    # PROMPTS[i] and PROMPTS[i + 10] are one question with another number: shared prefixes
    meets_flag = [p for p in PROMPTS if flagged in generate(tiny_server_off, p, n=16)["output_ids"][1:]]
    assert len(meets_flag) >= 3, "too few prompts meet the flagged token"
    vetoes = 0
    for prompt in meets_flag[:6] * 2:
        out = gen(radix_server, prompt, policy=ENFORCE).json()
        ids = out["output_ids"]
        assert flagged not in ids
        assert ids == expected_choice(offline_model, prompt, ids, flagged), prompt
        assert_trace_positions(out, flagged)
        vetoes += out["meta_info"]["tokenwise_safety"]["num_vetoes"]
    assert out["meta_info"]["cached_tokens"] > 0  # the radix cache really served a prefix
    assert vetoes >= 4


def test_retraction_and_mixed_chunks_keep_enforcement_exact(radix_server, offline_model, flagged):
    """16 concurrent enforced answers of 256 tokens overflow a 2048-token KV pool: SGLang
    retracts requests and re-prefills them (mixed with running decodes). Every answer is
    still exactly the enforced greedy answer, and its trace has one score per token."""
    prompts = PROMPTS[:16]
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda p: gen(radix_server, p, n=256, policy=ENFORCE).json(), prompts))
    assert sum(o["meta_info"]["num_retractions"] for o in outs) > 0  # retraction really happened
    for prompt, out in zip(prompts, outs):
        ids = out["output_ids"]
        assert len(ids) == 256 and flagged not in ids
        assert len(out["meta_info"]["harm_score"]) == len(ids)
        assert ids == expected_choice(offline_model, prompt, ids, flagged), prompt
        assert_trace_positions(out, flagged)


@pytest.fixture(scope="module")
def grammar_server(tiny_model, tiny_probe, tmp_path_factory):
    """Flags "a" and "x" (each one token of the tiny vocabulary)."""
    log = tmp_path_factory.mktemp("logs") / "grammar.log"
    flags = ["--safety-probe", str(tiny_probe), "--safety-scorer", f"token-ids:{A_ID},{X_ID}",
             "--safety-trace-detail", "full"]
    with Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS, log_path=log) as server:
        server.log = log
        yield server


def test_a_grammar_with_no_candidate_left_ends_that_request_only(grammar_server):
    """A regex that allows only "x", and "x" is flagged: after the veto nothing the
    grammar allows remains. The request ends with content_filter (it used to crash the
    scheduler in torch.multinomial); greedy and sampled; the server keeps serving."""
    server = grammar_server
    for temperature in (0, 1.0):
        body = {"text": "Say x:", "sampling_params": {"max_new_tokens": 4, "temperature": temperature,
                                                       "regex": "x", **ENFORCE}}
        r = requests.post(server.url + "/generate", json=body, timeout=120)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["output_ids"] == [] and out["text"] == ""
        reason = out["meta_info"]["finish_reason"]
        assert reason["type"] == "content_filter" and reason["reason"] == "grammar"
        stop = out["meta_info"]["tokenwise_safety"]["interventions"][-1]
        assert stop["stop"] == "grammar" and stop["position"] == 0
        assert stop["vetoed"] == [{"token": X_ID, "score": 1.0}]
    assert generate(server, "Hello", n=3)["meta_info"]["finish_reason"]["type"] == "length"
    assert "Traceback" not in server.log.read_text()


def test_a_redraw_right_before_a_stop_stays_in_the_summary(grammar_server):
    """Regex "[ab]x": a sampled "a" is re-drawn to "b", then "x", the only token left, is
    vetoed and the request ends. The re-draw at the last emitted position is filed one
    entry past the cut the stop makes, so it must be folded back, not cut with the rest
    (it was lost before)."""
    stop = {"position": 1, "vetoed": [{"token": X_ID, "score": 1.0}], "replacement": None,
            "pivot": False, "stop": "grammar"}
    redrawn, vetoes = 0, _metric(grammar_server, "tokenwise_safety_vetoes_total")
    for seed in range(16):
        body = {"text": "Say ax or bx:", "sampling_params": {
            "max_new_tokens": 4, "temperature": 1.0, "sampling_seed": seed, "regex": "[ab]x", **ENFORCE}}
        out = requests.post(grammar_server.url + "/generate", json=body, timeout=120).json()
        assert out["output_ids"] == [B_ID] and out["meta_info"]["finish_reason"]["reason"] == "grammar"
        records = out["meta_info"]["tokenwise_safety"]["interventions"]
        if len(records) == 2:
            redrawn += 1
            assert records == [{"position": 0, "vetoed": [{"token": A_ID, "score": 1.0}], "replacement": B_ID,
                                "pivot": False, "stop": None}, stop]
            assert out["meta_info"]["tokenwise_safety"]["num_vetoes"] == 2
        else:
            assert records == [stop]
    # the vetoes counter sees every veto (16 of "x", one per "a"), whatever the trace says
    assert redrawn == _metric(grammar_server, "tokenwise_safety_vetoes_total") - vetoes - 16
    assert redrawn, "no seed sampled the flagged 'a'"


# ---- --safety-on-error ---------------------------------------------------------------

@pytest.fixture(scope="module")
def fault_plan(tiny_server_off, offline_model):
    """Two tokens that the plugin-off answers carry at a known position (>= 2) in
    different prompts, never in any prompt: one scores NaN, one makes the scorer raise.
    Clean prompts carry neither."""
    tok = offline_model[1]
    outs = {p: generate(tiny_server_off, p, n=16)["output_ids"] for p in PROMPTS[:12]}
    prompt_ids = {t for p in outs for t in tok(p)["input_ids"]}
    holders = Counter(t for o in outs.values() for t in set(o))
    rare = [t for t, c in holders.items() if c == 1 and t not in prompt_ids
            and any(o.index(t) >= 2 for o in outs.values() if t in o)]
    assert len(rare) >= 2, "the tiny model's answers have no two rare tokens"
    nan_id, raise_id = rare[0], next(t for t in rare[1:]
                                     if not any(rare[0] in o and t in o for o in outs.values()))
    at = lambda t: next((p, o.index(t)) for p, o in outs.items() if t in o)  # noqa: E731
    clean = [p for p, o in outs.items() if nan_id not in o and raise_id not in o]
    return {"nan": nan_id, "raise": raise_id, "nan_at": at(nan_id), "raise_at": at(raise_id),
            "clean": clean, "off": outs}


def _fault_server(tiny_model, tiny_probe, plan, on_error, tmp_path_factory, extra=()):
    log = tmp_path_factory.mktemp("logs") / f"fault-{on_error}.log"
    scorer = f"token-ids:0+nan:{plan['nan']}+raise:{plan['raise']}"  # 0 (<pad>) is never emitted
    flags = ["--safety-probe", str(tiny_probe), "--safety-scorer", scorer, "--safety-on-error", on_error,
             "--safety-trace-detail", "full", *extra]
    return Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS, log_path=log)


def test_fail_closed_ends_the_affected_requests_and_keeps_serving(tiny_model, tiny_probe, fault_plan,
                                                                   tmp_path_factory):
    plan = fault_plan
    with _fault_server(tiny_model, tiny_probe, plan, "fail-closed", tmp_path_factory) as server:
        before = _metric(server, "tokenwise_safety_errors_total", action="fail_closed")
        for kind in ("nan", "raise"):
            prompt, k = plan[f"{kind}_at"]
            off = plan["off"][prompt]
            # enforce: the failed token was pending, so it is withheld
            out = gen(server, prompt, policy=ENFORCE).json()
            assert out["output_ids"] == off[:k], kind
            reason = out["meta_info"]["finish_reason"]
            assert reason["type"] == "content_filter" and reason["reason"] == "error"
            assert out["meta_info"]["tokenwise_safety"]["interventions"][-1]["stop"] == "error"
            assert len(out["meta_info"]["harm_score"]) == k
            # shadow: tokens are not held, the answer ends right after the failed one
            out = gen(server, prompt).json()
            assert out["output_ids"] == off[:k + 1], kind
            assert out["meta_info"]["finish_reason"]["reason"] == "error"
        # a NaN fails only its own row: clean requests beside it are untouched
        prompt, k = plan["nan_at"]
        jobs = [prompt] + plan["clean"][:5]
        with ThreadPoolExecutor(len(jobs)) as pool:
            outs = list(pool.map(lambda p: gen(server, p, policy=ENFORCE).json(), jobs))
        assert outs[0]["output_ids"] == plan["off"][prompt][:k]
        for p, out in zip(jobs[1:], outs[1:]):
            assert out["output_ids"] == plan["off"][p] and out["meta_info"]["finish_reason"]["type"] == "length"
            assert None not in out["meta_info"]["harm_score"]
        assert _metric(server, "tokenwise_safety_errors_total", action="fail_closed") >= before + 5
        assert generate(server, plan["clean"][0], n=16)["output_ids"] == plan["off"][plan["clean"][0]]


def test_fail_open_lets_the_affected_requests_run_unscored(tiny_model, tiny_probe, fault_plan,
                                                            tmp_path_factory):
    plan = fault_plan
    with _fault_server(tiny_model, tiny_probe, plan, "fail-open", tmp_path_factory) as server:
        before = _metric(server, "tokenwise_safety_errors_total", action="fail_open")
        for kind in ("nan", "raise"):
            prompt, k = plan[f"{kind}_at"]
            out = gen(server, prompt, policy=ENFORCE).json()
            assert out["output_ids"] == plan["off"][prompt], kind
            assert out["meta_info"]["finish_reason"]["type"] == "length"
            scores = out["meta_info"]["harm_score"]
            assert scores[k + 1] is None and scores.count(None) == 1  # the failed step, and only it
            assert out["meta_info"]["tokenwise_safety"]["num_scored"] == len(scores) - 1
        assert _metric(server, "tokenwise_safety_errors_total", action="fail_open") == before + 2
        assert "injected scorer fault" in server.log_path.read_text()
        # a NaN score never reaches the histogram (its sum would stay NaN for good)
        assert math.isfinite(_metric(server, "tokenwise_safety_token_harm_score_sum"))

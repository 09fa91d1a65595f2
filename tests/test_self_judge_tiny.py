"""Self-judgment on the real server (tiny Llama, random probe). The judge pass forks the
live request's KV: its verdict must equal what a fresh request over the same text gives,
while computing only the judge suffix; it must never touch the request's own output; and
aborted requests must leave SGLang's pools as they were (SGLang's own strict idle check).

The probe threshold is out of reach (the probe never vetoes) and the band covers every
score, so every 4th position is judged and only verdicts can change a decision.
"""
import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from transformers import AutoTokenizer

from tokenwise_safety import self_judge
from tokenwise_safety.launch.server import Server

from conftest import TINY_SERVER_FLAGS
from test_server_tiny import PROMPTS, generate

N, EVERY = 16, 4
STRICT = {"SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE": "1"}  # SGLang raises on a pool leak when idle


def judge_flags(probe, mode, verdict_threshold=0.5):
    return ["--safety-probe", str(probe), "--safety-mode", "enforce", "--safety-threshold", "0.999999",
            "--safety-trace-detail", "full", "--safety-self-judge", mode, "--safety-judge-band", "0,1",
            "--safety-judge-every", str(EVERY), "--safety-judge-threshold", str(verdict_threshold)]


@pytest.fixture(scope="module")
def shadow_judge(tiny_model, tiny_probe, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "judge_shadow.log"
    with Server(tiny_model, safety=judge_flags(tiny_probe, "shadow"), extra=TINY_SERVER_FLAGS,
                log_path=log, env=STRICT) as server:
        yield server


@pytest.fixture(scope="module")
def tok(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def suffix(tok):
    return self_judge.suffix_ids(tok, self_judge.DEFAULT_QUESTION)


def run_all(server, prompts, n=N):
    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(lambda p: generate(server, p, n=n), prompts))


@pytest.fixture(scope="module")
def shadow_runs(shadow_judge):
    return run_all(shadow_judge, PROMPTS)


def calls(out):
    return out["meta_info"]["tokenwise_safety"]["judge_calls"]


def test_judged_every_few_positions_and_shadow_changes_nothing(shadow_runs, tiny_server_off):
    plain = run_all(tiny_server_off, PROMPTS)
    for out, ref in zip(shadow_runs, plain):
        positions = [c["position"] for c in calls(out)]
        # due every EVERY positions; renewed early (after EVERY // 2) when another request's pass runs
        assert positions[0] == -1 and positions[-1] >= N - 1 - EVERY  # the last ones: held finish
        assert all(EVERY // 2 <= b - a <= EVERY for a, b in zip(positions, positions[1:]))
        assert out["meta_info"]["tokenwise_safety"]["interventions"] == []
        assert out["output_ids"] == ref["output_ids"]  # the fork never touched the live KV
        assert len(out["meta_info"]["harm_judge"]) == N


def test_verdict_equals_a_fresh_request_and_only_the_suffix_is_computed(shadow_judge, shadow_runs, tok, suffix):
    yes, no = self_judge.verdict_ids(tok)
    for prompt, out in list(zip(PROMPTS, shadow_runs))[:3]:
        prompt_ids = tok.encode(prompt)
        for call in calls(out):
            assert call["tokens"] == len(suffix)  # page size 1: the suffix alone
            text = prompt_ids + out["output_ids"][:call["position"] + 1] + suffix
            fresh = generate(shadow_judge, input_ids=text, n=1, return_logprob=True,
                             token_ids_logprob=yes + no)["meta_info"]
            assert fresh["prompt_tokens"] - fresh["cached_tokens"] == len(text)  # what the fork saved
            logp = {t: lp for lp, t, _ in fresh["output_token_ids_logprobs"][0]}
            lse = lambda ids: math.log(sum(math.exp(logp[t]) for t in ids))  # noqa: E731
            assert call["p_yes"] == pytest.approx(1 / (1 + math.exp(lse(no) - lse(yes))), abs=2e-4)


@pytest.fixture(scope="module")
def acting_judge(tiny_model, tiny_probe, shadow_runs, tmp_path_factory):
    """Verdict threshold at the median P(yes) of the shadow run: some verdicts say harmful."""
    values = sorted(c["p_yes"] for out in shadow_runs for c in calls(out))
    threshold = values[len(values) // 2]
    log = tmp_path_factory.mktemp("logs") / "judge_on.log"
    with Server(tiny_model, safety=judge_flags(tiny_probe, "on", threshold), extra=TINY_SERVER_FLAGS,
                log_path=log, env=STRICT) as server:
        yield server


def test_outputs_equal_the_shadow_run_except_where_a_verdict_acted(acting_judge, shadow_runs):
    acted = 0
    for out, ref in zip(run_all(acting_judge, PROMPTS), shadow_runs):
        effects = [c for c in calls(out) if c["effect"] != "none"]
        if not effects:
            assert out["output_ids"] == ref["output_ids"]
            continue
        acted += 1
        first = effects[0]
        assert first["effect"] == "triggered"
        position = max(first["position"], 0)
        assert out["output_ids"][:position] == ref["output_ids"][:position]
        intervention = out["meta_info"]["tokenwise_safety"]["interventions"][0]
        assert intervention["position"] == position
        if first["position"] >= 0:  # the judged token itself was vetoed first
            assert intervention["vetoed"][0]["token"] == ref["output_ids"][position]
    assert 0 < acted < len(PROMPTS)


def test_aborted_requests_leave_the_pools_as_they_were(acting_judge):
    """Streams cut after a few chunks: SGLang aborts them mid-decode, judge passes and all.
    The server then idles, where its strict check raises on any leaked row or KV slot."""
    body = lambda p: {"text": p, "stream": True, "sampling_params": {  # noqa: E731
        "max_new_tokens": 200, "temperature": 0, "ignore_eos": True}}

    def cut(prompt):
        with requests.post(acting_judge.url + "/generate", json=body(prompt), stream=True, timeout=120) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i >= 6:
                    break
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(cut, PROMPTS[:8]))
    time.sleep(5)  # idle: the scheduler runs its pool checks
    assert len(generate(acting_judge, PROMPTS[0], n=N)["output_ids"]) == N
    time.sleep(3)
    log = acting_judge.log_tail(400)
    assert "leak" not in log.lower() and "Traceback" not in log
    metrics = requests.get(acting_judge.url + "/metrics", timeout=30).text
    assert "tokenwise_safety_judge_tokens_total" in metrics

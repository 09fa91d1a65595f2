"""Launch flags the README documents, on the real server (tiny Llama): SGLang's overlap
scheduler kept for shadow serving, the startup refusals (unsupported speculative decoding, the client
override without its key), and hidden states that stay closed to clients although the
plugin captures them for itself (capture mode LAST)."""
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from tokenwise_safety.launch.server import Server
from tokenwise_safety.policy import OVERRIDE_KEY_ENV

from conftest import TINY_SERVER_FLAGS
from test_server_tiny import PROMPTS, generate, offline, offline_scores  # noqa: F401 (offline: fixture)
from test_startup_errors import assert_refused, launch, weightless_model  # noqa: F401 (fixture)

ENFORCE = {"tokenwise_safety": {"mode": "enforce"}}


# ---- startup refusals -----------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--speculative-algorithm", "EAGLE3"],
     "--speculative-algorithm EAGLE3 is not supported with --safety-plugin (supported: NGRAM, STANDALONE)"),
    (["--speculative-algorithm", "NGRAM", "--speculative-use-rejection-sampling"],
     "--speculative-use-rejection-sampling is not supported with --safety-plugin"),
], ids=["eagle3", "rejection-sampling"])
def test_unsupported_speculative_decoding_is_refused_at_startup(weightless_model, tiny_probe, flags, message):
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tiny_probe), *flags)
    assert_refused(proc, message)


@pytest.mark.parametrize("key_env", [None, ""], ids=["unset", "empty"])
def test_client_override_without_the_key_is_refused_at_startup(weightless_model, tiny_probe, key_env):
    env = {} if key_env is None else {OVERRIDE_KEY_ENV: key_env}
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tiny_probe),
                  "--safety-client-override", env=env, unset=[OVERRIDE_KEY_ENV] if key_env is None else [])
    assert_refused(proc, f"--safety-client-override needs the key in the environment: "
                         f"export {OVERRIDE_KEY_ENV}=")


def test_keep_overlap_schedule_with_enforce_mode_is_refused_at_startup(weightless_model, tiny_probe):
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tiny_probe),
                  "--safety-mode", "enforce", "--safety-keep-overlap-schedule")
    assert_refused(proc, "--safety-keep-overlap-schedule cannot be used with --safety-mode enforce")


# ---- --safety-keep-overlap-schedule ---------------------------------------------------
@pytest.fixture(scope="module")
def overlap_server(tiny_model, tiny_probe, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "overlap.log"
    flags = ["--safety-probe", str(tiny_probe), "--safety-keep-overlap-schedule",
             "--safety-trace-detail", "full"]
    with Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS, log_path=log) as server:
        yield server


def greedy_ids(offline, prompt_ids, output_ids):
    """transformers' greedy choice at each output position, given the output before it."""
    model, _, _ = offline
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([prompt_ids + output_ids[:-1]])).logits[0]
    return logits[len(prompt_ids) - 1:].argmax(-1).tolist()


def test_keep_overlap_schedule_serves_and_traces_exactly(overlap_server, offline):
    """With the overlap loop on, concurrent requests of different lengths (so some finish
    while others run) keep their tokens and get the exact score of every position."""
    assert requests.get(overlap_server.url + "/server_info", timeout=30).json()["disable_overlap_schedule"] is False
    _, tok, _ = offline
    cases = [(tok(p)["input_ids"], 6 + 3 * (i % 4)) for i, p in enumerate(PROMPTS[:8])]
    with ThreadPoolExecutor(len(cases)) as pool:
        outs = list(pool.map(lambda c: generate(overlap_server, input_ids=c[0], n=c[1]), cases))
    for (ids, n), out in zip(cases, outs):
        scores, output = out["meta_info"]["harm_score"], out["output_ids"]
        assert len(scores) == len(output) == n
        assert output == greedy_ids(offline, ids, output)  # shadow changed no token
        np.testing.assert_allclose(scores, offline_scores(offline, ids, output), atol=2e-4)
        assert out["meta_info"]["tokenwise_safety"]["mode"] == "shadow"


def test_enforce_request_on_keep_overlap_server_gets_400_naming_the_reason(overlap_server):
    reason = "needs a server launched without --safety-keep-overlap-schedule"
    r = requests.post(overlap_server.url + "/generate", timeout=60, json={
        "text": "Hello", "sampling_params": {"max_new_tokens": 3, "custom_params": ENFORCE}})
    assert r.status_code == 400 and reason in r.text, (r.status_code, r.text)
    r = requests.post(overlap_server.url + "/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3,
        "custom_params": ENFORCE})
    assert r.status_code == 400 and reason in r.text, (r.status_code, r.text)
    assert len(generate(overlap_server, "Hello", n=3)["meta_info"]["harm_score"]) == 3


# ---- hidden states stay closed to clients (issue 12, item 7) ---------------------------
def has_key(obj, key: str) -> bool:
    """Whether `key` is a field anywhere in decoded JSON (an error message may name it)."""
    if isinstance(obj, dict):
        return key in obj or any(has_key(v, key) for v in obj.values())
    return isinstance(obj, list) and any(has_key(v, key) for v in obj)


@pytest.mark.parametrize("ask", [True, "last"])
def test_client_cannot_get_hidden_states_from_a_plugin_server(tiny_server, ask):
    """The plugin runs SGLang's capture in mode LAST for its own probe; a client asking for
    hidden states must still be refused on every endpoint, as stock SGLang refuses it."""
    url, chat = tiny_server.url, [{"role": "user", "content": "Hello"}]
    asked = {
        "/generate": {"text": "Hello", "return_hidden_states": ask, "sampling_params": {"max_new_tokens": 2}},
        "/v1/completions": {"model": "tiny", "prompt": "Hello", "max_tokens": 2, "return_hidden_states": ask},
        "/v1/chat/completions": {"model": "tiny", "messages": chat, "max_tokens": 2, "return_hidden_states": ask},
    }
    for path, body in asked.items():
        r = requests.post(url + path, json=body, timeout=60)
        assert (r.status_code, has_key(r.json(), "hidden_states")) == (400, False), (path, r.text[:200])
    with requests.post(url + "/v1/chat/completions", json={**asked["/v1/chat/completions"], "stream": True},
                       stream=True, timeout=60) as r:
        chunks = [json.loads(l[6:]) for l in r.iter_lines(decode_unicode=True) if l.startswith("data: {")]
    assert not any(has_key(c, "hidden_states") for c in chunks), chunks[-1:]
    out = generate(tiny_server, "Hello", n=2)
    assert "hidden_states" not in out["meta_info"] and out["meta_info"]["tokenwise_safety"]["num_scored"] == 2

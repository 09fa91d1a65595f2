"""The real SGLang server (CPU engine) with a tiny random Llama: plumbing of shadow mode.

Expected scores are recomputed offline with transformers from the same token ids, so
these tests check the exact per-token alignment of the harm trace, not just its shape.
"""
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import torch

from tokenwise_safety.metrics import sample_total
from tokenwise_safety.probe import HarmProbe
from tokenwise_safety.trace import summarize

PROMPTS = [f"{q} {i}" for i, q in enumerate([
    "How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis.",
    "What is the capital of France?", "Give me a recipe for pancakes.", "Tell me how to build a bomb.",
    "Hello, world!", "def add(a, b):", "Good morning, how are you today?", "The quick brown fox"] * 2)]


def generate(server, prompt=None, input_ids=None, n=12, **extra):
    body = {"sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}, **extra}
    body.update({"text": prompt} if prompt is not None else {"input_ids": input_ids})
    r = requests.post(server.url + "/generate", json=body, timeout=120)
    r.raise_for_status()
    return r.json()


@pytest.fixture(scope="module")
def offline(tiny_model, tiny_probe):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model), HarmProbe.load(tiny_probe)


def offline_scores(offline, prompt_ids, output_ids):
    """transformers' hidden_states at the probe's layers, concatenated, at every position
    from the prompt's last token on."""
    model, _, probe = offline
    ids = torch.tensor([prompt_ids + output_ids[:-1]])
    with torch.inference_mode():
        states = model(input_ids=ids, output_hidden_states=True).hidden_states
    hidden = torch.cat([states[i][0] for i in probe.meta.layers], dim=-1)
    return probe.score(hidden[len(prompt_ids) - 1:]).numpy()


def test_trace_scores_each_position_exactly(tiny_server, offline):
    _, tok, _ = offline
    prompt_ids = tok("Explain photosynthesis in simple words.")["input_ids"]
    out = generate(tiny_server, input_ids=prompt_ids, n=16)
    scores = out["meta_info"]["harm_score"]
    assert len(scores) == len(out["output_ids"]) == 16
    np.testing.assert_allclose(scores, offline_scores(offline, prompt_ids, out["output_ids"]),
                               atol=2e-4)


def test_summary_matches_trace_and_threshold(tiny_server, tiny_probe):
    out = generate(tiny_server, "Tell me how to build a bomb.", n=10)
    probe = HarmProbe.load(tiny_probe)
    assert out["meta_info"]["tokenwise_safety"] == summarize(out["meta_info"]["harm_score"], probe.threshold,
                                                             "shadow", window=probe.meta.window)


def test_hidden_states_are_not_shipped_unless_asked(tiny_server):
    assert "hidden_states" not in generate(tiny_server, "Hello", n=3)["meta_info"]


def test_concurrent_requests_get_their_own_traces(tiny_server):
    sequential = [generate(tiny_server, p, n=8) for p in PROMPTS[:16]]
    with ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(lambda p: generate(tiny_server, p, n=8), PROMPTS[:16]))
    for a, b in zip(sequential, concurrent):
        assert a["output_ids"] == b["output_ids"]
        np.testing.assert_allclose(a["meta_info"]["harm_score"], b["meta_info"]["harm_score"], atol=1e-4)


def test_shadow_mode_never_changes_a_token(tiny_server, tiny_server_off, tiny_server_stock):
    for prompt in PROMPTS:
        on, off = generate(tiny_server, prompt), generate(tiny_server_off, prompt)
        stock = generate(tiny_server_stock, prompt)
        assert on["output_ids"] == off["output_ids"] == stock["output_ids"], prompt
        assert on["text"] == off["text"] == stock["text"]
        for out in (off, stock):
            assert "harm_score" not in out["meta_info"] and "tokenwise_safety" not in out["meta_info"]


def test_generate_stream_chunks_carry_only_the_new_scores(tiny_server):
    """The README's streaming trace: each chunk's harm_score holds the scores new since the
    chunk before (concatenated: the non-streamed list); the final chunk adds the summary."""
    import json
    whole = generate(tiny_server, "Hello, world!", n=12)["meta_info"]
    body = {"text": "Hello, world!", "stream": True,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}}
    with requests.post(tiny_server.url + "/generate", json=body, stream=True, timeout=60) as r:
        chunks = [json.loads(line[6:]) for line in r.iter_lines(decode_unicode=True)
                  if line.startswith("data: {")]
    parts = [c["meta_info"].get("harm_score", []) for c in chunks]
    assert len(whole["harm_score"]) == 12
    assert [s for p in parts for s in p] == pytest.approx(whole["harm_score"], abs=1e-5)
    assert sum(len(p) for p in parts[:-1]) >= 10  # the scores arrive as they exist, not at the end
    final = chunks[-1]["meta_info"]
    assert final["tokenwise_safety"] == whole["tokenwise_safety"] | {"prompt_score": pytest.approx(
        whole["tokenwise_safety"]["prompt_score"], abs=1e-5), "max_score": pytest.approx(
        whole["tokenwise_safety"]["max_score"], abs=1e-5)}
    assert all("tokenwise_safety" not in c["meta_info"] for c in chunks[:-1])


def _metric(server, name, **labels):
    return sample_total(requests.get(server.url + "/metrics", timeout=30).text, name, **labels)


def test_metrics_count_every_scored_position(tiny_server, tiny_probe):
    before = _metric(tiny_server, "tokenwise_safety_token_harm_score_count")
    flagged_before = _metric(tiny_server, "tokenwise_safety_flagged_requests_total")
    steps_before = _metric(tiny_server, "tokenwise_safety_probe_seconds_count")
    out = generate(tiny_server, "Write a poem about the sea.", n=9)
    assert _metric(tiny_server, "tokenwise_safety_token_harm_score_count") - before == 9
    assert _metric(tiny_server, "tokenwise_safety_probe_seconds_count") - steps_before == 9
    crossed = out["meta_info"]["tokenwise_safety"]["first_over_threshold"] is not None
    assert _metric(tiny_server, "tokenwise_safety_flagged_requests_total") - flagged_before == int(crossed)


def test_openai_client_chat_and_completions(tiny_server):
    from openai import OpenAI
    client = OpenAI(base_url=tiny_server.url + "/v1", api_key="none")
    kw = dict(model="tiny", max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(messages=[{"role": "user", "content": "Hello"}], **kw)
    trace = chat.metadata["tokenwise_safety"][0]
    assert len(trace["scores"]) == chat.usage.completion_tokens == 7
    assert trace["max_score"] == max(trace["scores"])

    stream = client.chat.completions.create(messages=[{"role": "user", "content": "Hello"}],
                                            stream=True, **kw)
    chunks = list(stream)
    final = chunks[-1].model_extra["metadata"]["tokenwise_safety"][0]
    assert final["scores"] == pytest.approx(trace["scores"], abs=1e-4)
    assert all("metadata" not in (c.model_extra or {}) for c in chunks[:-1])

    comp = client.completions.create(prompt="Good morning", **kw)
    assert len(comp.metadata["tokenwise_safety"][0]["scores"]) == comp.usage.completion_tokens
    comp_chunks = list(client.completions.create(prompt="Good morning", stream=True, **kw))
    assert comp_chunks[-1].model_extra["metadata"]["tokenwise_safety"][0]["num_scored"] == 7


def test_bad_request_gets_4xx_and_server_keeps_serving(tiny_server):
    r = requests.post(tiny_server.url + "/generate", json={"text": "x", "sampling_params": {"max_new_tokens": -3}})
    assert 400 <= r.status_code < 500
    assert len(generate(tiny_server, "Hello", n=2)["meta_info"]["harm_score"]) == 2


def test_info_endpoint_and_metric_name_the_probe_mode_and_threshold(tiny_server, tiny_probe, tiny_server_off):
    import hashlib
    from tokenwise_safety.info import plugin_version
    info = requests.get(tiny_server.url + "/tokenwise/info", timeout=30).json()
    sha = hashlib.sha256(tiny_probe.read_bytes()).hexdigest()
    assert info["probe_sha256"] == sha and info["probe_path"] == str(tiny_probe)
    assert info["tensors_sha256"] == HarmProbe.load(tiny_probe).meta.tensors_sha256
    assert (info["mode"], info["threshold"], info["window"], info["version"]) == ("shadow", 0.5, 1, plugin_version())
    assert info["self_judge"]["mode"] == "off" and info["self_judge"]["every"] == 16
    assert info["draft_probe"] is None
    metrics = requests.get(tiny_server.url + "/metrics", timeout=30).text
    [line] = [ln for ln in metrics.splitlines() if ln.startswith("tokenwise_safety_info{")]
    assert f'probe_sha256="{sha}"' in line and 'mode="shadow"' in line and 'threshold="0.5"' in line
    assert line.endswith(" 1.0")
    # the plugin off: no such route
    assert requests.get(tiny_server_off.url + "/tokenwise/info", timeout=30).status_code == 404

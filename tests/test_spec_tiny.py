"""Speculative decoding (NGRAM, STANDALONE) with the plugin, on the real CPU server (tiny Llama).

The token-id scorer flags three token ids, so every veto is known in advance. With greedy
decoding, speculation + plugin must produce exactly what non-speculative + plugin produces:
the same tokens, the same per-token scores, the same interventions (re-draws, pivots,
requests the plugin ended), over 32 prompts; and speculation with the plugin off must equal
plain decoding. The random tiny model repeats itself, which is what NGRAM drafts from,
so drafts are accepted and vetoed inside trees.
"""
from collections import Counter

import pytest
import requests

from tokenwise_safety.launch.server import Server
from tokenwise_safety.metrics import sample_total
from tokenwise_safety.policy import OVERRIDE_KEY_ENV

from conftest import TINY_SERVER_FLAGS
from test_server_tiny import PROMPTS, generate

KEY = "test-override-key"
NGRAM = ["--speculative-algorithm", "NGRAM", "--speculative-num-draft-tokens", "6"]


def spec_flags(algorithm: str, model) -> list[str]:
    """NGRAM drafts from the text so far; STANDALONE from a draft model (the tiny model
    itself, so its drafts are mostly right and vetoes happen inside long accepted runs)."""
    if algorithm == "NGRAM":
        return NGRAM
    return ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", str(model),
            "--speculative-num-steps", "3", "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4"]


ALGORITHMS = ["NGRAM", "STANDALONE"]
SPEC_PROMPTS = PROMPTS + [f"{w} {w} {w} {i}" for i, w in enumerate(
    ["one", "two", "list:", "a, b, c,", "x = x + 1;", "repeat", "for i in", "- item", "1 2 3", "la la",
     "abc", "the end"])]
ENFORCE = {"custom_params": {"tokenwise_safety": {"mode": "enforce"}}}


@pytest.fixture(scope="module")
def flagged(tiny_server_off):
    """The token the tiny model emits most often (re-draws), plus the two best tokens at
    one position of one answer (both vetoed there: more than --safety-max-vetoes 1, so
    the pivot comes in)."""
    outs = [generate(tiny_server_off, p, n=24, return_logprob=True, top_logprobs_num=2) for p in SPEC_PROMPTS]
    common = Counter(t for o in outs for t in o["output_ids"][1:]).most_common(1)[0][0]
    for o in outs:
        ids, top = o["output_ids"], o["meta_info"]["output_top_logprobs"]
        for pos in range(2, len(ids)):
            pair = [top[pos][0][1], top[pos][1][1]]
            if common not in pair and not {common, *pair} & set(ids[:pos]):
                return [common, *pair]
    raise AssertionError("no answer has a position whose two best tokens could both be flagged")


def _server(tiny_model, tiny_probe, flagged, log, spec: list[str], more: list[str] = ()):
    flags = ["--safety-probe", str(tiny_probe), "--safety-scorer", "token-ids:" + ",".join(map(str, flagged)),
             "--safety-client-override", "--safety-trace-detail", "full", "--safety-max-vetoes", "1", *more]
    return Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS + spec, log_path=log,
                  env={OVERRIDE_KEY_ENV: KEY})


@pytest.fixture(scope="module")
def plain_on(tiny_model, tiny_probe, flagged, tmp_path_factory):
    with _server(tiny_model, tiny_probe, flagged, tmp_path_factory.mktemp("logs") / "plain.log", []) as s:
        yield s


@pytest.fixture(scope="module", params=ALGORITHMS)
def spec_on(request, tiny_model, tiny_probe, flagged, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / f"{request.param}.log"
    with _server(tiny_model, tiny_probe, flagged, log, spec_flags(request.param, tiny_model)) as s:
        yield s


@pytest.fixture(scope="module", params=ALGORITHMS)
def spec_off(request, tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / f"{request.param}_off.log"
    with Server(tiny_model, safety=None, extra=TINY_SERVER_FLAGS + spec_flags(request.param, tiny_model),
                log_path=log) as s:
        yield s


def gen(server, prompt, n=24, policy=None):
    """Greedy; `prompt` is text, or token ids."""
    body = {"text" if isinstance(prompt, str) else "input_ids": prompt,
            "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True, **(policy or {})}}
    r = requests.post(server.url + "/generate", json=body, timeout=120)
    r.raise_for_status()
    return r.json()


def test_speculation_without_the_plugin_equals_plain_decoding(spec_off, tiny_server_off):
    accepted = 0
    for prompt in SPEC_PROMPTS:
        spec = gen(spec_off, prompt)
        assert spec["output_ids"] == gen(tiny_server_off, prompt)["output_ids"], prompt
        accepted += spec["meta_info"].get("spec_num_correct_drafts", 0) or 0
    assert accepted > 0  # drafts were accepted: speculative decoding really ran


def _decisions(out: dict) -> tuple:
    meta = out["meta_info"]
    trace = meta.get("tokenwise_safety") or {}
    finish = {k: v for k, v in (meta.get("finish_reason") or {}).items() if k != "message"}
    return out["output_ids"], meta.get("harm_score"), trace.get("interventions"), finish


def test_speculation_with_enforce_equals_plain_enforce(plain_on, spec_on, flagged):
    """Exact tokens, scores and interventions, for shadow and for enforce."""
    kinds = Counter()
    for prompt in SPEC_PROMPTS:
        for policy in (None, ENFORCE):
            plain, spec = gen(plain_on, prompt, policy=policy), gen(spec_on, prompt, policy=policy)
            assert _decisions(spec) == _decisions(plain), (prompt, policy)
            if policy:
                assert not set(flagged) & set(spec["output_ids"])
                for x in spec["meta_info"]["tokenwise_safety"]["interventions"]:
                    kinds["stop" if x["stop"] else "pivot" if x["pivot"] else "redraw"] += 1
    assert kinds["redraw"] and kinds["pivot"], kinds  # the prompts exercise both


def test_a_forced_pivot_is_committed_several_tokens_a_verify_step(plain_on, spec_on, flagged, tiny_model):
    """A prompt ending in a flagged token starts the answer with the pivot. Its tokens are
    placed as drafts and forced at verify, so the pivot takes about one step per D tokens
    instead of one step per token, and the answer is still exactly plain enforce's."""
    from transformers import AutoTokenizer

    from tokenwise_safety.config import DEFAULT_PIVOT
    tok = AutoTokenizer.from_pretrained(tiny_model)
    pivot = tok(DEFAULT_PIVOT, add_special_tokens=False)["input_ids"]
    assert len(pivot) >= 12
    prompt = tok(" ".join(PROMPTS[:2]))["input_ids"] + [flagged[0]]
    n = len(pivot) + 2
    plain, spec = gen(plain_on, prompt, n=n, policy=ENFORCE), gen(spec_on, prompt, n=n, policy=ENFORCE)
    assert _decisions(spec) == _decisions(plain)
    assert spec["output_ids"][:len(pivot)] == pivot
    first = spec["meta_info"]["tokenwise_safety"]["interventions"][0]
    assert first["pivot"] and first["position"] == 0
    d = int(spec_on.cmd[spec_on.cmd.index("--speculative-num-draft-tokens") + 1])
    # the prefill emits the pivot's first token; each verify step commits up to d more
    most = -(-(len(pivot) - 1) // d) + (n - len(pivot)) + 1
    assert spec["meta_info"]["spec_verify_ct"] <= most < len(pivot) - 1, spec["meta_info"]["spec_verify_ct"]


def test_speculation_accepts_drafts_under_enforce(spec_on):
    accepted = sum(gen(spec_on, p, policy=ENFORCE)["meta_info"].get("spec_num_correct_drafts", 0) or 0
                   for p in SPEC_PROMPTS[:8])
    assert accepted > 0


def _metric(text: str, name: str) -> float:
    return sample_total(text, name)


def test_drafts_are_vetoed_inside_trees_and_counted(spec_on, flagged):
    """Flagged tokens in draft trees are vetoed at verify (not only roots): the
    draft-veto counter grows, and accept lengths are recorded."""
    before = _metric(requests.get(spec_on.url + "/metrics", timeout=30).text, "tokenwise_safety_draft_vetoes_total")
    for prompt in SPEC_PROMPTS[:16]:
        gen(spec_on, prompt, policy=ENFORCE)
    text = requests.get(spec_on.url + "/metrics", timeout=30).text
    assert _metric(text, "tokenwise_safety_draft_vetoes_total") > before
    assert _metric(text, "tokenwise_safety_spec_accept_length_count") > 0


def test_speculative_stream_never_sends_a_vetoed_token(spec_on, flagged):
    """Streaming under speculation: each chunk extends the last (nothing sent is taken back),
    no flagged token is ever sent, and the stream ends with the non-streamed answer."""
    import json
    prompt, full = next((p, o) for p in SPEC_PROMPTS for o in [gen(spec_on, p, policy=ENFORCE)]
                        if o["meta_info"]["tokenwise_safety"]["num_vetoes"])
    body = {"text": prompt, "stream": True, "sampling_params": {
        "max_new_tokens": 24, "temperature": 0, "ignore_eos": True, **ENFORCE}}
    sent = []
    with requests.post(spec_on.url + "/generate", json=body, stream=True, timeout=120) as r:
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: {"):
                ids = json.loads(line[6:])["output_ids"]
                assert not set(flagged) & set(ids)
                assert ids[:len(sent)] == sent
                sent = ids
    assert sent == full["output_ids"]


def test_concurrent_mixed_policies_under_speculation_match_plain(plain_on, spec_on, flagged):
    """Eight concurrent requests, shadow and enforce mixed in one verify batch: each equals
    the same request on the plain server."""
    from concurrent.futures import ThreadPoolExecutor
    jobs = [(SPEC_PROMPTS[i], ENFORCE if i % 2 else None) for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda j: gen(spec_on, j[0], policy=j[1]), jobs))
    for (prompt, policy), out in zip(jobs, outs):
        assert out["output_ids"] == gen(plain_on, prompt, policy=policy)["output_ids"], (prompt, policy)


def test_standalone_with_the_probe_scores_every_token(tiny_model, tiny_probe, tmp_path_factory):
    """The probe reads the final hidden state: STANDALONE's target prefill asks for none
    (capture mode NULL), the plugin keeps it. Every output token is scored, and the
    scores equal plain decoding's (same model, same probe)."""
    log = tmp_path_factory.mktemp("logs") / "standalone_probe.log"
    flags = ["--safety-probe", str(tiny_probe), "--safety-trace-detail", "full"]
    with Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS + spec_flags("STANDALONE", tiny_model),
                log_path=log) as spec, Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS,
                                              log_path=log.with_name("plain_probe.log")) as plain:
        for prompt in SPEC_PROMPTS[:4]:
            a, b = gen(spec, prompt), gen(plain, prompt)
            assert a["output_ids"] == b["output_ids"]
            scores = a["meta_info"]["harm_score"]
            assert len(scores) == len(a["output_ids"]) and None not in scores
            assert scores == pytest.approx(b["meta_info"]["harm_score"], abs=1e-4)
    assert "scoring failed" not in log.read_text()


def tree_flags(model) -> list[str]:
    """STANDALONE with draft trees: two children per node, 4 levels, 8 nodes verified."""
    return ["--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", str(model),
            "--speculative-num-steps", "4", "--speculative-eagle-topk", "2", "--speculative-num-draft-tokens", "8"]


def test_harmless_first_drafting_keeps_outputs_and_accepts_more(plain_on, tiny_model, tiny_probe,
                                                                 flagged, tmp_path_factory):
    """A probe on the draft model (here the token-ids scorer: it flags what the target's veto
    flags) ranks down the children of flagged tree nodes: enforced outputs stay exactly those
    of plain enforce, and the same speculation accepts more drafts in fewer verify steps than
    without the draft probe."""
    logs = tmp_path_factory.mktemp("logs")
    spec = tree_flags(tiny_model)
    base = _server(tiny_model, tiny_probe, flagged, logs / "base.log", spec)
    first = _server(tiny_model, tiny_probe, flagged, logs / "harmless.log", spec,
                    ["--safety-draft-probe", str(tiny_probe)])
    counts, plain = {}, {p: _decisions(gen(plain_on, p, policy=ENFORCE)) for p in SPEC_PROMPTS}
    with base, first:
        info = requests.get(first.url + "/tokenwise/info", timeout=30).json()
        assert info["draft_probe"]["probe_path"] == str(tiny_probe)
        for name, server in (("base", base), ("first", first)):
            accepted = steps = 0
            for prompt in SPEC_PROMPTS:
                out = gen(server, prompt, policy=ENFORCE)
                assert _decisions(out) == plain[prompt], (name, prompt)
                accepted += out["meta_info"].get("spec_num_correct_drafts", 0) or 0
                steps += out["meta_info"]["spec_verify_ct"]
            text = requests.get(server.url + "/metrics", timeout=30).text
            counts[name] = (accepted, steps, _metric(text, "tokenwise_safety_draft_reranks_total"))
    print("accepted drafts, verify steps, reranks:", counts)
    assert counts["base"][2] == 0 and counts["first"][2] > 0
    assert counts["first"][0] > counts["base"][0] and counts["first"][1] < counts["base"][1]


def test_a_finish_inside_an_accepted_run_costs_no_extra_verify_step(spec_on):
    """A finish is held one step for its token's score only when that token is the
    unscored bonus. A run that crosses max_new_tokens at an accepted draft (scored and
    judged in that verify pass) finishes at once: enforce takes the same verify steps as
    shadow there, one more where the cap fell on the bonus, never more."""
    extra = []
    for prompt in SPEC_PROMPTS:
        for n in (11, 22):
            # NGRAM drafts from a corpus of earlier answers: both runs meet it warmed alike
            gen(spec_on, prompt, n=n), gen(spec_on, prompt, n=n, policy=ENFORCE)
            shadow, enforced = gen(spec_on, prompt, n=n), gen(spec_on, prompt, n=n, policy=ENFORCE)
            if enforced["meta_info"]["tokenwise_safety"]["interventions"]:
                continue  # vetoes change the tokens; only untouched answers compare
            assert enforced["output_ids"] == shadow["output_ids"]
            extra.append(enforced["meta_info"]["spec_verify_ct"] - shadow["meta_info"]["spec_verify_ct"])
    assert len(extra) >= 10 and set(extra) <= {0, 1}, extra
    assert 0 in extra, extra  # before this, every enforced finish took one step more

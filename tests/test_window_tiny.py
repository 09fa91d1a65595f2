"""Enforce mode driven by a real probe (tiny Llama, random directions) that reads a tapped
middle layer beside the final one and judges with a window of 2: a token is vetoed only
when its own state and the committed state before it both score over the threshold.

The expected output is simulated offline with transformers, candidate by candidate,
so every veto and replacement is known in advance. Model, probe and prompts are fixed
(seeded), so the case the simulation picks is fixed too: finding none is a failure.
"""
import pytest
import torch

from tokenwise_safety.launch.server import Server
from tokenwise_safety.probe import HarmProbe
from tokenwise_safety.trace import judged_harmful

from conftest import TINY_SERVER_FLAGS, random_probe
from test_server_tiny import PROMPTS, generate

N = 16
TOP_K, MAX_VETOES = 20, 3


@pytest.fixture(scope="module")
def window_probe(tiny_model, tmp_path_factory):
    return random_probe(tiny_model, tmp_path_factory.mktemp("probe") / "window.json", seed=7,
                        layers=(1, -1), window=2)


@pytest.fixture(scope="module")
def window_server(tiny_model, window_probe, tmp_path_factory):
    """Shadow with a threshold no state reaches; requests tighten it and ask for enforce."""
    log = tmp_path_factory.mktemp("logs") / "window.log"
    flags = ["--safety-probe", str(window_probe), "--safety-threshold", "0.999999",
             "--safety-top-k", str(TOP_K), "--safety-max-vetoes", str(MAX_VETOES),
             "--safety-trace-detail", "full"]  # the tests read scores and vetoed token ids
    with Server(tiny_model, safety=flags, extra=TINY_SERVER_FLAGS, log_path=log) as server:
        yield server


class ReachesPivot(Exception):
    """The simulated case would end in the pivot, which these tests do not cover."""


class Offline:
    def __init__(self, model_dir, probe_path):
        from transformers import AutoModelForCausalLM, AutoTokenizer
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.probe = HarmProbe.load(probe_path)

    def run(self, ids):
        """(score of the last position's state, logits there) for a token sequence."""
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        feats = torch.cat([out.hidden_states[i][0, -1] for i in self.probe.meta.layers])
        return float(self.probe.score(feats[None])[0]), out.logits[0, -1]

    def greedy(self, prompt_ids, n=N):
        """Plain greedy decoding (what the plugin-off server serves), EOS ignored."""
        out = []
        for _ in range(n):
            out.append(int(self.run(prompt_ids + out)[1].argmax()))
        return out

    def scores(self, prompt_ids, output):
        return [self.run(prompt_ids + output[:i])[0] for i in range(len(output))]

    def enforce(self, prompt_ids, threshold, n=N):
        """Greedy decoding with window-2 vetoes: (output ids, [(position, [vetoed ids])])."""
        s, logits = self.run(prompt_ids)
        assert s < threshold  # the cases below never start in the pivot
        out, interventions, last = [], [], s
        for _ in range(n):
            cands = torch.topk(logits, TOP_K).indices.tolist()
            vetoed = []
            for tok in cands[:MAX_VETOES + 1]:
                s, nxt = self.run(prompt_ids + out + [tok])
                if min(s, last) < threshold:
                    break
                vetoed.append(tok)
            else:
                raise ReachesPivot
            if vetoed:
                interventions.append((len(out), vetoed))
            out.append(tok)
            last, logits = s, nxt
        return out, interventions


@pytest.fixture(scope="module")
def offline(tiny_model, window_probe):
    return Offline(tiny_model, window_probe)


@pytest.fixture(scope="module")
def case(offline):
    """A prompt and threshold where window 1 would act strictly earlier than window 2, and
    no score lies within 1e-3 of the threshold (server and transformers agree to ~1e-5):
    (prompt ids, greedy output, its scores, threshold, (expected output, interventions))."""
    for prompt in PROMPTS:
        prompt_ids = offline.tok(prompt)["input_ids"]
        off = offline.greedy(prompt_ids)
        scores = offline.scores(prompt_ids, off)
        ordered = sorted(scores)
        for lo, hi in zip(ordered, ordered[1:]):
            t = (lo + hi) / 2
            if hi - lo < 2e-3 or scores[0] >= t:
                continue
            one, two = judged_harmful(scores, t, 1), judged_harmful(scores, t, 2)
            if one and two and one[0] < two[0]:
                try:
                    expected = offline.enforce(prompt_ids, t)
                except ReachesPivot:
                    continue
                return prompt_ids, off, scores, t, expected
    pytest.fail("no prompt separates window 1 from window 2 for the seeded probe: "
                "the tiny model, the probe or the prompts changed")


def test_window_two_vetoes_only_sustained_harm(window_server, case):
    prompt_ids, off, scores, t, (expected, interventions) = case
    policy = {"custom_params": {"tokenwise_safety": {"mode": "enforce", "threshold": t}}}
    out = generate(window_server, input_ids=prompt_ids, n=N, **{"sampling_params": {
        "max_new_tokens": N, "temperature": 0, "ignore_eos": True, **policy}})
    assert out["output_ids"] == expected
    summary = out["meta_info"]["tokenwise_safety"]
    assert summary["window"] == 2
    assert [(x["position"], [v["token"] for v in x["vetoed"]]) for x in summary["interventions"]] == interventions
    # the first veto lands where window 2 first judges harm, later than a lone spike
    first = judged_harmful(scores, t, 2)[0]
    assert interventions[0][0] == first - 1 and interventions[0][1][0] == off[first - 1]
    assert judged_harmful(scores, t, 1)[0] < first


def test_shadow_reports_the_window_two_crossing(window_server, case):
    prompt_ids, off, scores, t, _ = case
    policy = {"custom_params": {"tokenwise_safety": {"threshold": t}}}
    out = generate(window_server, input_ids=prompt_ids, n=N, **{"sampling_params": {
        "max_new_tokens": N, "temperature": 0, "ignore_eos": True, **policy}})
    assert out["output_ids"] == off
    assert out["meta_info"]["harm_score"] == pytest.approx(scores, abs=2e-4)
    assert out["meta_info"]["tokenwise_safety"]["first_over_threshold"] == judged_harmful(scores, t, 2)[0]

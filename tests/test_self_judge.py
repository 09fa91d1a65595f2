"""The self-judgment core without a server: verdict maths, the standing verdict, the suffix
in a real chat template, and the settings' checks."""
import math

import pytest
import torch
from transformers import AutoTokenizer

from tokenwise_safety import self_judge
from tokenwise_safety.self_judge import JudgeConfig, JudgeState


def test_p_yes_is_the_yes_share_of_yes_plus_no():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0, 5.0], [0.0, 3.0, 0.0, 0.0, 9.0]])
    yes, no = torch.tensor([0, 2]), torch.tensor([1])
    p = self_judge.p_yes(logits, yes, no)
    e = logits.exp()
    expected = (e[:, 0] + e[:, 2]) / (e[:, 0] + e[:, 2] + e[:, 1])
    assert torch.allclose(p, expected, atol=1e-6)
    # tokens outside yes and no (here the 9.0) do not move the verdict
    assert float(self_judge.p_yes(logits + torch.tensor([0, 0, 0, 0, 50.0]), yes, no)[1]) == pytest.approx(
        float(p[1]), abs=1e-6)


def test_a_verdict_stands_for_every_positions():
    st = JudgeState()
    assert st.standing(0, 4) is None  # never judged: a pass is due
    st.position, st.harmful = 3, True
    assert [st.standing(p, 4) for p in (3, 6, 7)] == [True, True, None]
    st.position, st.harmful = -1, False  # the prompt's verdict covers the first positions
    assert [st.standing(p, 4) for p in (0, 2, 3)] == [False, False, None]
    assert [st.half_spent(p, 4) for p in (0, 1, 2)] == [False, True, True]
    assert not st.half_spent(5, 1) and not JudgeState().half_spent(9, 4)


@pytest.mark.parametrize("probe_over, harmful, effect", [
    (True, True, "confirmed"), (True, False, "cancelled"), (False, True, "triggered"), (False, False, "none")])
def test_effect_names_what_the_verdict_did(probe_over, harmful, effect):
    assert self_judge.effect(probe_over, harmful) == effect


def test_suffix_closes_the_answer_turn_in_the_models_own_template(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = self_judge.suffix_text(tok, "Is it harmful?")
    assert text.startswith("<end_of_turn>") and "Is it harmful?" in text
    assert text.rstrip().endswith("model")  # the model's turn is open for its verdict


def test_a_model_without_a_chat_template_gets_plain_text(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = None
    assert self_judge.suffix_text(tok, "Q?") == "\n\nQ?\nAnswer:"


class _Tok:
    def __init__(self, table):
        self.table = table

    def encode(self, text, add_special_tokens=False):
        return self.table.get(text, [99])


def test_verdict_ids_drop_tokens_that_start_both_words():
    tok = _Tok({"yes": [1], "Yes": [2], " yes": [7, 1], " Yes": [7, 2], "YES": [3],
                "no": [4], "No": [5], " no": [7, 4], " No": [7, 5], "NO": [6]})
    assert self_judge.verdict_ids(tok) == ([1, 2, 3], [4, 5, 6])  # 7 (a bare space) says nothing
    with pytest.raises(self_judge.JudgeSetupError, match="does not tell 'yes' from 'no'"):
        self_judge.verdict_ids(_Tok({}))  # every word starts with token 99


@pytest.mark.parametrize("kwargs, message", [
    ({"mode": "maybe"}, "is not one of off, on, shadow"),
    ({"low": 0.5, "high": 0.4}, "need 0 <= LOW <= HIGH <= 1"),
    ({"every": 0}, "must be at least 1"),
    ({"verdict_threshold": 0.0}, "strictly between 0 and 1"),
    ({"question": "  "}, "must not be empty"),
])
def test_bad_settings_say_which_flag(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JudgeConfig(**kwargs)


def test_p_yes_of_equal_logits_is_the_count_share():
    p = self_judge.p_yes(torch.zeros(1, 6), torch.tensor([0]), torch.tensor([1, 2]))
    assert float(p[0]) == pytest.approx(1 / 3, abs=1e-6)
    assert math.isclose(float(self_judge.p_yes(torch.zeros(1, 3), torch.tensor([0]), torch.tensor([1]))[0]), 0.5)


def judge_config(args, cfg, model):
    """server_args._judge_config with the probe's metadata, as validate hands it over."""
    from tokenwise_safety.patches.server_args import _judge_config
    from tokenwise_safety.probe import HarmProbe
    return _judge_config(args, cfg, model, HarmProbe.load(cfg.probe_path).meta)


def _args(**flags):
    import argparse
    base = {"safety_self_judge": "on", "safety_judge_band": None, "safety_judge_every": 16,
            "safety_judge_threshold": 0.5, "safety_judge_question": self_judge.DEFAULT_QUESTION,
            "speculative_algorithm": None}
    return argparse.Namespace(**{**base, **flags})


@pytest.mark.parametrize("flags, message", [
    ({"safety_judge_band": "low"}, "--safety-judge-band 'low': use LOW,HIGH"),
    ({"safety_judge_every": 0}, "--safety-judge-every 0 must be at least 1"),
    ({"safety_judge_threshold": 1.0}, "--safety-judge-threshold 1.0 must lie"),
    ({"safety_judge_question": ""}, "--safety-judge-question must not be empty"),
])
def test_launch_settings_are_checked_with_the_flag_named(tiny_model, tiny_probe, flags, message):
    """The launch-level refusals (one line, server never starts) are in test_startup_refusals."""
    from tokenwise_safety.config import ConfigError, SafetyConfig
    with pytest.raises(ConfigError, match=message):
        judge_config(_args(**flags), SafetyConfig(probe_path=tiny_probe), str(tiny_model))


def test_overlap_and_speculation_rule_judging_out(tiny_model, tiny_probe):
    from tokenwise_safety.config import ConfigError, SafetyConfig
    with pytest.raises(ConfigError, match="needs enforce"):
        judge_config(_args(), SafetyConfig(probe_path=tiny_probe, keep_overlap=True), str(tiny_model))
    with pytest.raises(ConfigError, match="not supported with --speculative-algorithm"):
        judge_config(_args(speculative_algorithm="NGRAM"), SafetyConfig(probe_path=tiny_probe), str(tiny_model))
    assert judge_config(_args(safety_self_judge="off", speculative_algorithm="NGRAM"),
                        SafetyConfig(probe_path=tiny_probe), str(tiny_model))["mode"] == "off"


def test_the_calibration_band_spans_the_folds_thresholds_and_the_served_one():
    record = {"leave_one_source_out": {"per_source": {
        "a": {"threshold": 0.991}, "b": {"threshold": 0.9963}, "c": {"threshold": None}, "d": {"auroc": {}}}}}
    assert self_judge.calibration_band(record, 0.997) == (0.991, 0.997)
    assert self_judge.calibration_band(record, 0.5) == (0.5, 0.9963)  # an operator's --safety-threshold
    assert self_judge.calibration_band({}, 0.997) is None


def test_the_default_band_comes_from_the_served_probes_record(tiny_model, tiny_probe):
    """The shipped Qwen2.5-Coder-1.5B probe: folds 0.9905-0.997, served 0.99699. A probe
    without leave-one-source-out folds (the tiny test probe) keeps the fixed band; a band
    given at launch wins."""
    from pathlib import Path

    from tokenwise_safety.config import SafetyConfig
    qwen = Path(self_judge.__file__).parent / "probes" / "qwen-1.5b.json"
    judge = judge_config(_args(), SafetyConfig(probe_path=qwen), str(tiny_model))
    assert (judge["low"], judge["high"]) == pytest.approx((0.9905, 0.997), abs=1e-4)
    judge = judge_config(_args(), SafetyConfig(probe_path=qwen, threshold=0.9), str(tiny_model))
    assert (judge["low"], judge["high"]) == pytest.approx((0.9, 0.997), abs=1e-4)
    judge = judge_config(_args(), SafetyConfig(probe_path=tiny_probe), str(tiny_model))
    assert (judge["low"], judge["high"]) == (JudgeConfig.low, JudgeConfig.high)
    judge = judge_config(_args(safety_judge_band="0.3,0.6"), SafetyConfig(probe_path=qwen), str(tiny_model))
    assert (judge["low"], judge["high"]) == (0.3, 0.6)

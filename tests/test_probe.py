"""Probe maths against a float64 reference, artifact round-trip, and artifact errors."""
import json

import numpy as np
import pytest
import torch

from conftest import random_probe
from tokenwise_safety.probe import HarmProbe, ProbeError


@pytest.fixture
def probe_path(tiny_model, tmp_path):
    return random_probe(tiny_model, tmp_path / "p.json", k=6, seed=3)


def reference_scores(tensors, hidden: np.ndarray) -> np.ndarray:
    """The unfolded pipeline, step by step, in float64."""
    t = {k: v.double().numpy() for k, v in tensors.items()}
    z = (hidden - t["mean"]) / t["scale"]
    p = (z - t["pca_mean"]) @ t["components"].T if "components" in t else z
    logit = p @ t["coef"] + t["intercept"][0]
    return 1.0 / (1.0 + np.exp(-logit))


def test_folded_scores_match_float64_reference(probe_path):
    probe = HarmProbe.load(probe_path)
    hidden = np.random.default_rng(0).normal(size=(37, probe.meta.hidden_size))
    expected = reference_scores(probe.tensors, hidden)
    got = probe.score(torch.from_numpy(hidden).float()).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6)


def test_probe_without_pca_matches_reference(tiny_model, tmp_path):
    probe = HarmProbe.load(random_probe(tiny_model, tmp_path / "nopca.json", k=0, layers=(1, -1)))
    assert "components" not in probe.tensors
    hidden = np.random.default_rng(1).normal(size=(11, probe.meta.features))
    got = probe.score(torch.from_numpy(hidden).float()).numpy()
    np.testing.assert_allclose(got, reference_scores(probe.tensors, hidden), rtol=0, atol=2e-6)


def test_bf16_hidden_states_are_scored_in_fp32(probe_path):
    probe = HarmProbe.load(probe_path)
    hidden = torch.randn(5, probe.meta.hidden_size).bfloat16()
    expected = reference_scores(probe.tensors, hidden.double().numpy())
    np.testing.assert_allclose(probe.score(hidden).numpy(), expected, atol=2e-6)
    assert probe.score(hidden).dtype == torch.float32


def test_round_trip_preserves_tensors_and_metadata(probe_path, tmp_path):
    probe = HarmProbe.load(probe_path)
    again = HarmProbe.load(probe.save(tmp_path / "copy.json"))
    for name, tensor in probe.tensors.items():
        assert torch.equal(tensor, again.tensors[name])
    assert again.meta.model_fingerprint == probe.meta.model_fingerprint
    assert again.meta.threshold == probe.meta.threshold
    assert len(again.meta.tensors_sha256) == 64


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(ProbeError, match="not found: .*nowhere.json"):
        HarmProbe.load(tmp_path / "nowhere.json")


def test_corrupt_tensors_fail_sha_check(probe_path):
    tensors = probe_path.with_suffix(".safetensors")
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(ProbeError, match="corrupt: sha256"):
        HarmProbe.load(probe_path)


def test_corrupt_metadata_is_reported(probe_path):
    probe_path.write_text("{not json")
    with pytest.raises(ProbeError, match="metadata .* is corrupt"):
        HarmProbe.load(probe_path)


def test_shape_metadata_mismatch_is_reported(probe_path):
    meta = json.loads(probe_path.read_text())
    meta["k"] = 7
    probe_path.write_text(json.dumps(meta))
    with pytest.raises(ProbeError, match="tensor components has shape"):
        HarmProbe.load(probe_path)


def test_wrong_hidden_size_is_refused_at_scoring(probe_path):
    probe = HarmProbe.load(probe_path)
    with pytest.raises(ProbeError, match="hidden size"):
        probe.score(torch.zeros(2, probe.meta.hidden_size + 1))


def test_format_1_artifact_loads_as_one_layer_window_one(probe_path):
    import json
    meta_path = probe_path.with_suffix(".json")
    raw = json.loads(meta_path.read_text())
    raw["layer"] = raw.pop("layers")[0]
    raw.pop("window")
    raw["format_version"] = 1
    meta_path.write_text(json.dumps(raw))
    probe = HarmProbe.load(probe_path)
    assert probe.meta.layers == [-1] and probe.meta.window == 1


def test_features_are_layers_times_hidden_size(tiny_model, tmp_path):
    probe = HarmProbe.load(random_probe(tiny_model, tmp_path / "two.json", layers=(1, -1), window=2))
    assert probe.meta.features == 2 * probe.meta.hidden_size and probe.meta.window == 2
    with pytest.raises(ProbeError, match="feature size 64 != probe's 128"):
        probe.score(torch.zeros(3, 64))

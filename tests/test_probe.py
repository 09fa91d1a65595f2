"""Probe maths against a float64 reference, artifact round-trip, and artifact errors."""
import json
from pathlib import Path

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


# ---- item 6: a dot in the probe's name ------------------------------------------------
@pytest.mark.parametrize("given", ["llama-3.1-8b.json", "llama-3.1-8b.safetensors", "llama-3.1-8b"])
def test_dotted_name_round_trips_and_leaves_its_neighbour_alone(tiny_model, probe_path, tmp_path, given):
    probe = HarmProbe.load(probe_path)
    random_probe(tiny_model, tmp_path / "llama-3.json", k=6, seed=7)  # another probe, the same stem
    files = [tmp_path / "llama-3.json", tmp_path / "llama-3.safetensors"]
    neighbour = [f.read_bytes() for f in files]
    assert probe.save(tmp_path / given) == tmp_path / "llama-3.1-8b.json"
    assert (tmp_path / "llama-3.1-8b.safetensors").is_file()
    assert [f.read_bytes() for f in files] == neighbour  # not overwritten
    again = HarmProbe.load(tmp_path / given)  # this probe, not the neighbour
    assert all(torch.equal(t, again.tensors[n]) for n, t in probe.tensors.items())


def test_artifact_paths_strip_only_the_artifact_suffixes(tmp_path):
    from tokenwise_safety.probe import artifact_paths
    assert artifact_paths(tmp_path / "m.v2.json") == (tmp_path / "m.v2.json", tmp_path / "m.v2.safetensors")
    assert artifact_paths("p/m.v2.safetensors") == (Path("p/m.v2.json"), Path("p/m.v2.safetensors"))
    assert artifact_paths("m.tar") == (Path("m.tar.json"), Path("m.tar.safetensors"))


# ---- item 9: the artifact's own numbers are checked -----------------------------------
@pytest.mark.parametrize("field,value,message", [
    ("threshold", 0.0, r"threshold 0\.0 must be a finite number strictly between 0 and 1"),
    ("threshold", 1.0, "threshold 1.0 must be"),
    ("threshold", -0.2, "threshold -0.2 must be"),
    ("threshold", float("nan"), "threshold nan must be"),
    ("threshold", float("inf"), "threshold inf must be"),
    ("threshold", "0.5", "threshold '0.5' must be"),
    pytest.param("threshold", 10 ** 400, r"threshold 1000000000000000000000000000000000000\.\.\. must be",
                 id="threshold-400-digit-int"),
    ("window", 0, "window 0 must be an integer from 1 to 8"),
    ("window", 9, "window 9 must be an integer from 1 to 8"),
    ("window", 2.5, "window 2.5 must be"),
    ("layers", [], r"layers \[\] must be a non-empty list"),
])
def test_bad_metadata_values_are_refused_in_one_line(probe_path, field, value, message):
    raw = json.loads(probe_path.read_text())
    raw[field] = value
    probe_path.write_text(json.dumps(raw))  # json writes nan / inf as NaN / Infinity, which it reads back
    with pytest.raises(ProbeError, match=message) as err:
        HarmProbe.load(probe_path)
    assert "\n" not in str(err.value) and str(probe_path) in str(err.value)


@pytest.mark.parametrize("name,bad", [("mean", float("nan")), ("scale", float("inf")), ("pca_mean", float("nan")),
                                      ("components", float("-inf")), ("coef", float("nan")),
                                      ("intercept", float("inf"))])
def test_non_finite_tensor_is_refused(probe_path, tmp_path, name, bad):
    probe = HarmProbe.load(probe_path)
    tensors = {k: v.clone() for k, v in probe.tensors.items()}
    tensors[name].view(-1)[0] = bad
    path = HarmProbe(tensors, probe.meta).save(tmp_path / "bad.json")  # sha256 matches the bad tensors
    with pytest.raises(ProbeError, match=f"tensor {name} holds NaN or inf values") as err:
        HarmProbe.load(path)
    assert "\n" not in str(err.value)


def test_zero_scale_is_refused(probe_path, tmp_path):
    probe = HarmProbe.load(probe_path)
    tensors = {k: v.clone() for k, v in probe.tensors.items()}
    tensors["scale"][[3, 5]] = 0.0
    path = HarmProbe(tensors, probe.meta).save(tmp_path / "zero.json")
    with pytest.raises(ProbeError, match=r"tensor scale holds 2 zero\(s\), which would divide by zero"):
        HarmProbe.load(path)


@pytest.mark.parametrize("model", ["smollm2", "qwen-0.5b", "qwen-1.5b", "gemma3-270m"])
def test_shipped_probe_passes_the_checks(model):
    from tokenwise_safety.bundled import probe_path
    probe = HarmProbe.load(probe_path(model))
    assert 0 < probe.threshold < 1 and 1 <= probe.meta.window <= 8

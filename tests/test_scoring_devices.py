"""Per-step scoring on every available device (CUDA cases skip where there is no GPU)."""
import numpy as np
import pytest
import torch

from tokenwise_safety.probe import HarmProbe, ProbeMeta
from tokenwise_safety.scoring import HostScores, StepScorer, TokenIdScorer

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def make_probe(hidden=96, k=5, seed=1) -> HarmProbe:
    g = torch.Generator().manual_seed(seed)
    tensors = {"mean": torch.randn(hidden, generator=g), "scale": torch.rand(hidden, generator=g) + 0.5,
               "pca_mean": torch.randn(hidden, generator=g) * 0.1,
               "components": torch.randn(k, hidden, generator=g) / hidden ** 0.5,
               "coef": torch.randn(k, generator=g), "intercept": torch.tensor([-0.2])}
    return HarmProbe(tensors, ProbeMeta("test", [-1], hidden, k, 0.5, {}, {}))


def reference(probe: HarmProbe, hidden: torch.Tensor) -> np.ndarray:
    t = {k: v.double() for k, v in probe.tensors.items()}
    z = (hidden.double().cpu() - t["mean"]) / t["scale"]
    logit = (z - t["pca_mean"]) @ t["components"].T @ t["coef"] + t["intercept"][0]
    return torch.sigmoid(logit).numpy()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_scores_match_reference(device, dtype):
    probe = make_probe()
    hidden = torch.randn(16, 96).to(device=device, dtype=dtype)
    scores, seconds = StepScorer(probe).score_step(hidden)
    assert scores.device.type == device and scores.dtype == torch.float32 and seconds >= 0
    np.testing.assert_allclose(scores.cpu().numpy(), reference(probe, hidden), atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_host_scores_index_as_floats_and_report_once(device):
    seen = []
    values = torch.rand(7, device=device)
    host = HostScores(values, on_ready=seen.append)
    assert len(host) == 7
    assert [host[i] for i in range(7)] == pytest.approx(values.cpu().tolist())
    assert isinstance(host[3], float)
    assert len(seen) == 1 and seen[0] == pytest.approx(values.cpu().tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_token_id_scorer_flags_exactly_the_listed_ids(device):
    scorer = TokenIdScorer([5, 9])
    ids = torch.tensor([1, 5, 7, 9, 5], device=device)
    scores, _ = scorer.score_step(torch.zeros(5, 4, device=device), ids)
    assert scores.tolist() == [0.0, 1.0, 0.0, 1.0, 1.0]

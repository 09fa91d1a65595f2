"""Re-running calibration with the shipped probe's choices reproduces its held-out
figures (slow: about 10 minutes, most of it the model's own answers)."""
import subprocess
import sys

import pytest

from tokenwise_safety.bundled import PROBE_PATH
from tokenwise_safety.probe import HarmProbe

pytestmark = pytest.mark.slow


def test_recalibration_reproduces_heldout_figures(bundled_model, tmp_path):
    shipped = HarmProbe.load(PROBE_PATH).meta
    out = tmp_path / "probe.json"
    choice = ["--layer-sets=" + ",".join(map(str, shipped.layers)), f"--cs={shipped.provenance['logistic_C']}",
              f"--windows={shipped.window}", "--no-cache"]  # a real re-extraction, not the cached features
    subprocess.run([sys.executable, "-m", "tokenwise_safety.calibrate", "--model", str(bundled_model),
                    "--out", str(out), *choice], check=True, timeout=2400)
    fresh = HarmProbe.load(out).meta
    assert fresh.model_fingerprint == shipped.model_fingerprint
    assert (fresh.layers, fresh.window) == (shipped.layers, shipped.window)
    assert abs(fresh.threshold - shipped.threshold) <= 0.02
    for pos, auroc in shipped.metrics["heldout_auroc"].items():
        assert abs(fresh.metrics["heldout_auroc"][pos] - auroc) <= 0.02, pos
    for name, rate in shipped.metrics["heldout_requests_at_threshold"].items():
        assert abs(fresh.metrics["heldout_requests_at_threshold"][name] - rate) <= 0.05, name

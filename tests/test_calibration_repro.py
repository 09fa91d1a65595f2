"""Re-running calibration reproduces the shipped probe's held-out AUROC (slow: minutes)."""
import json
import subprocess
import sys

import pytest

from tokenwise_safety.bundled import PROBE_PATH
from tokenwise_safety.probe import HarmProbe

pytestmark = pytest.mark.slow


def test_recalibration_reproduces_heldout_auroc(bundled_model, tmp_path):
    shipped = HarmProbe.load(PROBE_PATH).meta
    out = tmp_path / "probe.json"
    subprocess.run([sys.executable, "-m", "tokenwise_safety.calibrate", "--model", str(bundled_model),
                    "--out", str(out)], check=True, timeout=1800)
    fresh = HarmProbe.load(out).meta
    for pos, auroc in shipped.metrics["heldout_auroc"].items():
        assert abs(fresh.metrics["heldout_auroc"][pos] - auroc) <= 0.02, pos
    assert fresh.model_fingerprint == shipped.model_fingerprint

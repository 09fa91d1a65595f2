"""The load-test runner end to end on the tiny model: real servers (off, enforce) one after
the other, real Locust users, the reports it promises."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import TINY_SERVER_FLAGS
from tokenwise_safety.loadtest import report


def test_loadtest_runs_each_mode_and_writes_csvs_summary_and_plot(tiny_model, tiny_probe, tmp_path):
    out = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "tokenwise_safety.loadtest", "--model-path", str(tiny_model),
                    "--probe", str(tiny_probe), "--modes", "off,enforce", "--users", "4", "--spawn-rate", "4",
                    "--run-time", "20s", "--max-tokens", "8", "--max-prompt-chars", "300", "--long-turns", "2",
                    *[f"--server-arg={a}" for a in TINY_SERVER_FLAGS], "--out", str(out)],
                   check=True, timeout=900)
    doc = json.loads((out / "summary.json").read_text())
    assert list(doc["modes"]) == ["off", "enforce"]
    for mode, m in doc["modes"].items():
        assert m["requests"] > 0 and m["failures"] == 0, (mode, m)
        assert m["responses"] == m["requests"]
        assert 0 < m["latency_ms"]["p50"] <= m["latency_ms"]["p95"] <= m["latency_ms"]["p99"]
        assert 0 < m["ttft_ms"]["p50"] <= m["latency_ms"]["p99"]
        assert m["completion_tokens_per_s"] > 0
        assert (out / f"{mode}_stats.csv").is_file() and (out / f"{mode}_stats_history.csv").is_file()
    # the trace rides on every enforce response and on none with the plugin off
    assert doc["modes"]["off"]["responses_with_trace"] == 0
    assert doc["modes"]["enforce"]["responses_with_trace"] == doc["modes"]["enforce"]["responses"]
    assert doc["modes"]["enforce"]["interventions_per_1k_tokens"] is not None
    assert doc["modes"]["off"]["interventions_per_1k_tokens"] is None
    assert doc["slo"]["failures"] == 0 and "enforce_p99_over_off" in doc["slo"]
    assert (out / "latency.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| enforce |" in (out / "summary.md").read_text()


def test_slo_needs_both_modes_and_no_failure():
    ok = {"failures": 0, "latency_ms": {"p99": 100.0}}
    assert report.slo({"off": ok, "enforce": {**ok, "latency_ms": {"p99": 110.0}}})["passed"]
    assert not report.slo({"off": ok, "enforce": {**ok, "latency_ms": {"p99": 111.0}}})["passed"]
    assert not report.slo({"off": ok, "enforce": {**ok, "failures": 1}})["passed"]
    assert not report.slo({"off": ok})["passed"]

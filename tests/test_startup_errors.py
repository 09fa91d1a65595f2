"""Each bad launch stops `python -m sglang.launch_server` with one clear line, before any
model is loaded, and the plugin leaves SGLang's own flags alone."""
import json
import subprocess
import sys

import pytest

from conftest import random_probe
from tokenwise_safety.launch.server import server_command, server_env


def launch(model, *flags, timeout=180, env=None):
    cmd = server_command(model, 1, safety=None) + list(flags)
    return subprocess.run(cmd, env={**server_env(), **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def test_unknown_plugin_name(tiny_model):
    proc = launch(tiny_model, "--safety-plugin", "nonesuch")
    assert proc.returncode == 2
    assert "--safety-plugin: invalid choice: 'nonesuch'" in error_line(proc)


def test_missing_probe(tiny_model, tmp_path):
    proc = launch(tiny_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tmp_path / "no.json"))
    assert proc.returncode == 2
    assert error_line(proc).startswith("tokenwise-safety: error: safety probe file not found")


def test_corrupt_probe(tiny_model, tmp_path):
    path = random_probe(tiny_model, tmp_path / "p.json")
    path.with_suffix(".safetensors").write_bytes(b"garbage")
    proc = launch(tiny_model, "--safety-plugin", "tokenwise", "--safety-probe", str(path))
    assert proc.returncode == 2
    assert "are corrupt: sha256" in error_line(proc)


def test_probe_for_another_hidden_size(tiny_model, bundled_model, tmp_path):
    path = random_probe(bundled_model, tmp_path / "gemma.json")
    proc = launch(tiny_model, "--safety-plugin", "tokenwise", "--safety-probe", str(path))
    assert proc.returncode == 2
    assert "is for hidden size 640" in error_line(proc) and "calibrate" in error_line(proc)


def test_probe_for_another_model_with_same_hidden_size(tiny_model, tmp_path):
    path = random_probe(tiny_model, tmp_path / "p.json")
    meta = json.loads(path.read_text())
    meta["model_fingerprint"] = "cfg-sha256:0000000000000000"
    path.write_text(json.dumps(meta))
    proc = launch(tiny_model, "--safety-plugin", "tokenwise", "--safety-probe", str(path))
    assert proc.returncode == 2
    assert "was calibrated on model cfg-sha256:0000000000000000" in error_line(proc)


def test_threshold_out_of_range(tiny_model, tiny_probe):
    proc = launch(tiny_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tiny_probe),
                  "--safety-threshold", "1.5")
    assert proc.returncode == 2
    assert "--safety-threshold 1.5 must lie strictly between 0 and 1" in error_line(proc)


def test_window_out_of_range(tiny_model, tiny_probe):
    proc = launch(tiny_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tiny_probe),
                  "--safety-window", "0")
    assert proc.returncode == 2
    assert "--safety-window 0 must be between 1 and 8" in error_line(proc)


def test_probe_layer_outside_the_model(tiny_model, tmp_path):
    path = random_probe(tiny_model, tmp_path / "deep.json", layers=(5, -1))  # the tiny model has 2 layers
    proc = launch(tiny_model, "--safety-plugin", "tokenwise", "--safety-probe", str(path))
    assert proc.returncode == 2
    assert "reads layers [5], outside 1..2 of the served model" in error_line(proc)


def test_stock_sglang_does_not_know_the_flag(tiny_model):
    from conftest import STOCK_ENV
    proc = launch(tiny_model, "--safety-plugin", "tokenwise", env=STOCK_ENV)
    assert proc.returncode == 2
    assert "unrecognized arguments: --safety-plugin tokenwise" in error_line(proc)


def test_help_lists_the_flags():
    proc = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"],
                          env=server_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0
    for flag in ("--safety-plugin", "--safety-probe", "--safety-mode", "--safety-threshold"):
        assert flag in proc.stdout

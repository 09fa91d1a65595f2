"""Each bad launch stops `python -m sglang.launch_server` with one clear line and exit code
2, before any model is loaded, and the plugin leaves SGLang's own flags alone.

"No model loaded" is made observable: the refused launches serve a copy of the tiny model
without its weights file. Loading it fails loudly ("Cannot find any model weights"), so an
error that came after a load attempt could not be the only line on stderr; the control
test shows that a launch which passes validation does reach the load and fails there.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from conftest import random_probe
from tokenwise_safety.launch.server import server_command, server_env

# A Python warning's first line; its continuation lines are indented.
_WARNING = re.compile(r"^\S+\.py:\d+: \w*Warning: ")


@pytest.fixture(scope="session")
def weightless_model(tiny_model, tmp_path_factory):
    """The tiny model's config and tokenizer without model.safetensors."""
    out = tmp_path_factory.mktemp("weightless")
    for f in tiny_model.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    return out


def launch(model, *flags, timeout=240, env=None, unset=()):
    """Run the server command to its end; kills its whole process group on timeout."""
    full_env = {**server_env(), **(env or {})}
    for name in unset:
        full_env.pop(name, None)
    proc = subprocess.Popen(server_command(model, 1, safety=None) + list(flags), env=full_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def stderr_lines(stderr: str) -> list[str]:
    """stderr without blank lines and the leading Python warnings that third-party imports
    (SGLang's, before argument parsing) print; a warning after the first other line stays."""
    lines = [l for l in stderr.splitlines() if l.strip()]
    i = 0
    while i < len(lines) and _WARNING.match(lines[i]):
        assert "site-packages" in lines[i] and "tokenwise_safety" not in lines[i], lines[i]
        i += 1
        while i < len(lines) and lines[i][0].isspace():
            i += 1
    return lines[i:]


def assert_refused(proc, message: str) -> str:
    """Exit code 2, nothing on stdout, and stderr is exactly our one error line."""
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == 2, (proc.returncode, lines[-20:])
    assert proc.stdout == ""
    assert len(lines) == 1, lines
    assert lines[0].startswith("tokenwise-safety: error: ") and message in lines[0], lines[0]
    return lines[0]


def assert_usage_error(proc, message: str) -> None:
    """argparse's own refusal (SGLang's parser): its usage block, then one error line."""
    lines = stderr_lines(proc.stderr)
    assert proc.returncode == 2, (proc.returncode, lines[-20:])
    assert proc.stdout == ""
    assert lines[0].startswith("usage: ") and all(l[0].isspace() for l in lines[1:-1]), lines[:3]
    assert ": error: " in lines[-1] and message in lines[-1], lines[-1]


def test_a_valid_launch_of_the_weightless_copy_reaches_weight_loading(weightless_model, tiny_probe):
    """Control: past validation the server does try to load the model, and fails there."""
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tiny_probe))
    assert proc.returncode != 0
    assert "Cannot find any model weights" in proc.stdout + proc.stderr
    assert not any(l.startswith("tokenwise-safety: error") for l in stderr_lines(proc.stderr))


def test_unknown_plugin_name(weightless_model):
    proc = launch(weightless_model, "--safety-plugin", "nonesuch")
    assert_usage_error(proc, "--safety-plugin: invalid choice: 'nonesuch'")


def test_missing_probe(weightless_model, tmp_path):
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tmp_path / "no.json"))
    assert_refused(proc, f"safety probe file not found: {tmp_path / 'no.json'}")


def test_corrupt_probe(weightless_model, tiny_model, tmp_path):
    path = random_probe(tiny_model, tmp_path / "p.json")
    path.with_suffix(".safetensors").write_bytes(b"garbage")
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(path))
    assert_refused(proc, "are corrupt: sha256")


def test_probe_for_another_hidden_size(weightless_model, bundled_model, tmp_path):
    path = random_probe(bundled_model, tmp_path / "default.json")  # SmolLM2-135M: hidden size 576
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(path))
    line = assert_refused(proc, "is for hidden size 576")
    assert "calibrate" in line


def test_probe_for_another_model_with_same_hidden_size(weightless_model, tiny_model, tmp_path):
    path = random_probe(tiny_model, tmp_path / "p.json")
    meta = json.loads(path.read_text())
    meta["model_fingerprint"] = "cfg-sha256:0000000000000000"
    path.write_text(json.dumps(meta))
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(path))
    assert_refused(proc, "was calibrated on model cfg-sha256:0000000000000000")


def test_threshold_out_of_range(weightless_model, tiny_probe):
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tiny_probe),
                  "--safety-threshold", "1.5")
    assert_refused(proc, "--safety-threshold 1.5 must lie strictly between 0 and 1")


def test_window_out_of_range(weightless_model, tiny_probe):
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(tiny_probe),
                  "--safety-window", "0")
    assert_refused(proc, "--safety-window 0 must be between 1 and 8")


def test_probe_layer_outside_the_model(weightless_model, tiny_model, tmp_path):
    path = random_probe(tiny_model, tmp_path / "deep.json", layers=(5, -1))  # the tiny model has 2 layers
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", "--safety-probe", str(path))
    assert_refused(proc, "reads layers [5], outside 1..2 of the served model")


def test_stock_sglang_does_not_know_the_flag(weightless_model):
    from conftest import STOCK_ENV
    proc = launch(weightless_model, "--safety-plugin", "tokenwise", env=STOCK_ENV)
    assert_usage_error(proc, "unrecognized arguments: --safety-plugin tokenwise")


def test_help_lists_the_flags():
    proc = subprocess.run([sys.executable, "-m", "sglang.launch_server", "--help"],
                          env=server_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0
    for flag in ("--safety-plugin", "--safety-probe", "--safety-mode", "--safety-threshold"):
        assert flag in proc.stdout

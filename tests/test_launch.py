"""The launch layer: the installer deletes only what it made, the serving dtype follows the
CPU, and every server started through launch.server sleeps when idle."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tokenwise_safety.launch import server as launch
from tokenwise_safety.launch.server import Server, choose_dtype, cpu_info, server_command, serving_dtype

REPO = Path(__file__).resolve().parents[1]
INSTALL = REPO / "launch" / "install.sh"


# ---- the installer -------------------------------------------------------------------
def run_install(venv: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """install.sh with TOKENWISE_VENV=venv. PYTHON=false: a build it starts fails at its
    first step (`$PYTHON -m venv`), so no test can start a multi-minute build."""
    env = {**os.environ, "TOKENWISE_VENV": str(venv), "TOKENWISE_CACHE": str(tmp_path / "cache"),
           "PYTHON": "false"}
    start = time.monotonic()
    done = subprocess.run(["bash", str(INSTALL)], env=env, capture_output=True, text=True, timeout=60)
    assert time.monotonic() - start < 30, "install.sh ran long: it must not have started a build"
    return done


def test_installer_refuses_a_folder_it_did_not_make(tmp_path):
    venv = tmp_path / "my-project"
    venv.mkdir()
    (venv / "precious.txt").write_text("years of work")
    done = run_install(venv, tmp_path)
    assert done.returncode != 0
    assert (venv / "precious.txt").read_text() == "years of work"
    assert done.stderr.strip().splitlines() == [
        f"[tokenwise install] error: {venv} exists and was not made by this installer: "
        "remove it yourself or set TOKENWISE_VENV to another folder"]


def test_installer_refuses_a_plain_file(tmp_path):
    venv = tmp_path / "notes.txt"
    venv.write_text("keep")
    done = run_install(venv, tmp_path)
    assert done.returncode != 0 and venv.read_text() == "keep"
    assert "was not made by this installer" in done.stderr


def test_installer_rebuilds_its_own_half_built_venv(tmp_path):
    venv = tmp_path / "venv"
    venv.mkdir()
    (venv / ".tokenwise-installer").touch()  # marked by an earlier, interrupted run
    (venv / "half-installed").write_text("stale")
    done = run_install(venv, tmp_path)
    assert done.returncode != 0  # PYTHON=false stops the rebuild at `python -m venv`
    assert "building venv" in done.stderr
    assert not (venv / "half-installed").exists()
    # The new build marked the folder before running anything that can fail.
    assert sorted(p.name for p in venv.iterdir()) == [".tokenwise-installer"]


# ---- the serving dtype -----------------------------------------------------------------
AVX2_ONLY = {"fpu", "sse4_2", "avx", "avx2", "fma"}


@pytest.mark.parametrize("flags,dtype", [
    (AVX2_ONLY, "float32"),
    (AVX2_ONLY | {"avx512f", "avx512bw"}, "float32"),  # AVX-512 without its bf16 extension
    (AVX2_ONLY | {"avx512f", "avx512_bf16"}, "bfloat16"),
    (AVX2_ONLY | {"amx_tile", "amx_bf16"}, "bfloat16"),
    (set(), "float32"),  # no /proc/cpuinfo
])
def test_dtype_follows_the_cpu(flags, dtype):
    chosen, why = choose_dtype(flags)
    assert chosen == dtype
    assert ("natively" in why) == (dtype == "bfloat16") and "\n" not in why


def test_cpu_info_reads_model_name_and_flags():
    text = ("processor\t: 0\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx avx2 fma\n\n"
            "processor\t: 1\nmodel name\t: AMD EPYC 7B13\nflags\t\t: fpu avx avx2 fma\n")
    assert cpu_info(text) == ("AMD EPYC 7B13", {"fpu", "avx", "avx2", "fma"})
    assert cpu_info("") == ("unknown", set())


@pytest.fixture
def cpu_only(monkeypatch):
    """A CPU machine with the given flags (monkeypatched: the choice, not this machine)."""
    monkeypatch.setattr(launch, "has_cuda", lambda: False)

    def use(flags):
        monkeypatch.setattr(launch, "cpu_info", lambda text=None: ("test cpu", set(flags)))
    return use


def _value(cmd, flag):
    assert cmd.count(flag) == 1, cmd
    return cmd[cmd.index(flag) + 1]


def test_command_carries_the_chosen_dtype(cpu_only):
    cpu_only(AVX2_ONLY)
    assert _value(server_command("m", 1, None), "--dtype") == "float32"
    cpu_only(AVX2_ONLY | {"avx512_bf16"})
    assert _value(server_command("m", 1, None), "--dtype") == "bfloat16"


@pytest.mark.parametrize("extra", [["--dtype", "bfloat16"], ["--dtype=bfloat16"]])
def test_a_given_dtype_wins(cpu_only, extra):
    cpu_only(AVX2_ONLY)
    cmd = server_command("m", 1, None, extra)
    assert [a for a in cmd if a.startswith("--dtype")] == [extra[0]]
    assert cmd[-len(extra):] == extra
    assert serving_dtype(extra) == ("bfloat16", "--dtype given")


def test_cuda_keeps_sglang_auto(monkeypatch):
    monkeypatch.setattr(launch, "has_cuda", lambda: True)
    assert "--dtype" not in server_command("m", 1, None)
    assert serving_dtype([])[0] == "auto"


def test_sleep_on_idle_by_default_once_and_can_be_left_off(cpu_only):
    cpu_only(AVX2_ONLY)
    assert server_command("m", 1, None, ["--x"]).count("--sleep-on-idle") == 1
    assert server_command("m", 1, [], ["--sleep-on-idle"]).count("--sleep-on-idle") == 1
    assert "--sleep-on-idle" not in server_command("m", 1, [], sleep_on_idle=False)


# ---- real servers ------------------------------------------------------------------------
def _group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of every live process in a process group."""
    ticks, total = os.sysconf("SC_CLK_TCK"), 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # exited meanwhile
        if int(fields[2]) == pgid:
            total += int(fields[11]) + int(fields[12])
    return total / ticks


def test_idle_server_sleeps(tiny_model, tmp_path):
    with Server(tiny_model, safety=None, extra=["--dtype", "float32"], log_path=tmp_path / "idle.log") as s:
        pgid = os.getpgid(s.proc.pid)
        time.sleep(3)  # past start-up work
        before, start = _group_cpu_seconds(pgid), time.monotonic()
        time.sleep(6)
        per_second = (_group_cpu_seconds(pgid) - before) / (time.monotonic() - start)
    # Busy-polling holds a core (~1.0 CPU-s/s; less when the machine is shared); asleep ~0.03.
    assert per_second < 0.25, f"idle server used {per_second:.2f} CPU-seconds per second"


@pytest.mark.slow
def test_embedded_default_says_which_dtype_and_why(bundled_model):
    """serve.py prints the dtype line before anything else; an unknown SGLang flag then
    stops the server early, so this starts no model."""
    done = subprocess.run([sys.executable, "-m", "tokenwise_safety.launch.serve", "--port", "1",
                           "--no-such-sglang-flag"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    dtype, why = choose_dtype(cpu_info()[1])
    lines = done.stderr.splitlines()
    assert lines[0] == f"[tokenwise serve] dtype {dtype}: {why} (override: --dtype)"
    assert f"--dtype {dtype}" in lines[1] and "--sleep-on-idle" in lines[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its reaper is not serving
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _group(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group: the server and SGLang's children."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().split(")")[-1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_the_callers_death_stops_its_servers(tiny_model, tmp_path, sig):
    """Servers run in sessions of their own, so a bench or test run killed by SIGTERM (a CI
    timeout, `kill`) left them serving: now the caller stops them, then dies of the signal.
    A SIGKILL reaches no handler: the kernel kills the server (the parent-death signal set
    at its start) and SGLang's children follow."""
    script = (f"import time\nfrom tokenwise_safety.launch.server import Server\n"
              f"s = Server({str(tiny_model)!r}, safety=None, extra=['--dtype', 'float32'], "
              f"log_path={str(tmp_path / 'term.log')!r}).start()\n"
              "print(s.proc.pid, flush=True)\ntime.sleep(600)\n")
    caller = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pid = int(caller.stdout.readline())
    try:
        assert _alive(pid) and len(_group(pid)) >= 3  # launcher, scheduler, detokenizer
        caller.send_signal(sig)
        assert caller.wait(timeout=90) == -sig
        deadline = time.monotonic() + 30
        while _group(pid) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group(pid)
    finally:
        caller.kill()
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

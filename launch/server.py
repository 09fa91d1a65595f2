"""Start and stop a real SGLang server (CPU engine where there is no GPU).

Used by the embedded default (`python -m tokenwise_safety.launch.serve`), the tests,
the benchmark and the evaluation harness. Stops the server by PID, whole process group.

Defaults a caller may override: on CPU the dtype follows the CPU (bfloat16 only where it
computes bf16 natively; emulated bf16 decodes ~2.5x slower than float32 at batch 16 on an
AVX2-only EPYC), and `--sleep-on-idle` (an idle SGLang scheduler otherwise busy-polls a
whole core, taken from whatever runs beside it).
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags of CPUs that compute bf16 in hardware


def cpu_info(cpuinfo: str | None = None) -> tuple[str, set[str]]:
    """(model name, flags) from /proc/cpuinfo text (read when not given); ("unknown", set())
    where there is none (not Linux)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    name, flags = "unknown", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and name == "unknown":
            name = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / arm
            flags = set(value.split())
    return name, flags


def choose_dtype(flags: set[str]) -> tuple[str, str]:
    """CPU serving dtype from the CPU's flags: (dtype, why)."""
    native = [f for f in NATIVE_BF16_FLAGS if f in flags]
    if native:
        return "bfloat16", f"the CPU computes bf16 natively ({', '.join(native)})"
    return "float32", ("the CPU has no native bf16 (neither " + " nor ".join(NATIVE_BF16_FLAGS) +
                       "): emulated bf16 would decode slower than float32")


def _given(flag: str, args) -> str | None:
    """The value of `flag` in an argv list (`--flag V` or `--flag=V`), else None."""
    args = list(args)
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def serving_dtype(extra=(), cuda: bool | None = None) -> tuple[str, str]:
    """(dtype, why) a server started with `extra` flags runs in."""
    given = _given("--dtype", extra)
    if given is not None:
        return given, "--dtype given"
    if has_cuda() if cuda is None else cuda:
        return "auto", "CUDA: SGLang's auto dtype (the model's own)"
    return choose_dtype(cpu_info()[1])


def server_command(model_path, port, safety: list[str] | None, extra: list[str] = (),
                   sleep_on_idle: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", "127.0.0.1", "--port", str(port)]
    if not has_cuda():
        # Without --max-total-tokens the CPU engine reserves a very large KV pool.
        cmd += ["--device", "cpu", "--max-total-tokens", "16384"]
        if _given("--dtype", extra) is None:
            cmd += ["--dtype", serving_dtype(extra, cuda=False)[0]]
    if sleep_on_idle and "--sleep-on-idle" not in extra:
        cmd.append("--sleep-on-idle")
    if safety is not None:
        cmd += ["--safety-plugin", "tokenwise", *safety]
    return cmd + list(extra)


def server_env() -> dict:
    env = dict(os.environ)
    if not has_cuda():
        env.setdefault("SGLANG_USE_CPU_ENGINE", "1")
        # On few cores, OpenMP oversubscription costs far more than it gains.
        env.setdefault("OMP_NUM_THREADS", "1")
    return env


_LIVE: set["Server"] = set()  # servers this process started and has not stopped


def _stop_live_then_die(signum, _frame) -> None:
    """SIGTERM (a CI timeout, `kill`, a cancelled job): the servers run in sessions of their
    own, so nothing else would stop them. Stop each, then die of the signal as before."""
    for server in list(_LIVE):
        server.stop()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with(prctl, caller: int) -> None:
    """preexec_fn of the server: SIGKILL it when its caller dies, even of a SIGKILL, which no
    handler sees (SGLang's scheduler and detokenizer then follow: they set the same on
    themselves). Only a call between fork and exec: prctl was looked up before the fork."""
    prctl(PR_SET_PDEATHSIG, ctypes.c_ulong(signal.SIGKILL))
    if os.getppid() != caller:  # the caller died before the line above
        os._exit(1)


def _death_signal():
    """The preexec_fn that ties a server to this process, or None where it cannot: off Linux,
    without a prctl to call, and off the main thread (the kernel sends the signal when the
    forking *thread* ends, so a server started from a worker thread would die with it)."""
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    caller = os.getpid()
    return lambda: _die_with(prctl, caller)


def _guard_sigterm() -> None:
    """Install the handler once, from the main thread, where nobody set one of their own."""
    if threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _stop_live_then_die)


class Server:
    """A running `sglang.launch_server`; `with Server(...) as s: requests.post(s.url + ...)`.
    It runs in a session of its own; a SIGTERM to this process stops it too, and so does
    this process's death by SIGKILL when it was started from the main thread (unless
    dies_with_caller=False: a fleet replica outlives `fleet up`)."""

    def __init__(self, model_path, safety: list[str] | None = None, extra: list[str] = (),
                 port: int | None = None, log_path: str | Path | None = None, timeout: float = 300,
                 inherit_output: bool = False, env: dict | None = None, sleep_on_idle: bool = True,
                 dies_with_caller: bool = True):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = server_command(model_path, self.port, safety, extra, sleep_on_idle)
        self.dtype, self.dtype_reason = serving_dtype(extra)
        self.log_path = Path(log_path) if log_path else None
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.inherit_output = inherit_output
        self.env = {**server_env(), **(env or {})}
        self.dies_with_caller = dies_with_caller  # False: a daemon another command stops by PID

    def start(self) -> "Server":
        if self.inherit_output:
            out, err = None, None
        else:
            out = open(self.log_path, "w") if self.log_path else subprocess.DEVNULL
            err = subprocess.STDOUT
        _guard_sigterm()
        self.proc = subprocess.Popen(self.cmd, env=self.env, stdout=out, stderr=err,
                                     start_new_session=True,
                                     preexec_fn=_death_signal() if self.dies_with_caller else None)
        _LIVE.add(self)
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} before ready: "
                                   f"{' '.join(self.cmd)}\n{self.log_tail()}")
            try:
                if requests.get(self.url + "/health_generate", timeout=30).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(1)
        self.stop()
        raise TimeoutError(f"server not ready after {self.timeout}s\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        if self.log_path and self.log_path.exists():
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return "(no log)"

    def stop(self) -> None:
        _LIVE.discard(self)
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = os.getpgid(self.proc.pid)
        os.killpg(pgid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(pgid, signal.SIGKILL)
            self.proc.wait()
        # Children (scheduler, detokenizer) share the group; make sure none outlive it.
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

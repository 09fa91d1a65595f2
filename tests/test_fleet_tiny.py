"""The fleet end to end on the tiny model: two real replicas behind the real router (smg),
a staged rollout shadow -> canary -> enforce and a rollback, under Locust load."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from conftest import TINY_SERVER_FLAGS
from tokenwise_safety.launch import fleet

LOCUSTFILE = fleet.Path(__file__).resolve().parents[1] / "loadtest" / "locustfile.py"


def free_ports(n: int) -> list[int]:
    """n consecutive free ports on 127.0.0.1."""
    for base in range(42000, 60000, 97):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return list(range(base, base + n))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def wait_for_responses(path, which, n: int = 5, timeout: float = 180) -> None:
    """Until n responses matching `which` are recorded (Locust builds its prompts first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and sum(which(json.loads(x)) for x in path.read_text().splitlines()) >= n:
            return
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} responses after {timeout} s")


def run_fleet(env, *args) -> dict | None:
    out = subprocess.run([sys.executable, "-m", "tokenwise_safety.launch.fleet", *args], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout) if out.stdout.strip() else None


@pytest.fixture
def fleet_env(tiny_model, tiny_probe, tmp_path):
    router, first, second = free_ports(3)
    config = {"model": "tiny", "model_path": str(tiny_model), "replicas": 2, "router_port": router,
              "first_port": first, "probe": {"path": str(tiny_probe),
                                            "sha256": hashlib.sha256(tiny_probe.read_bytes()).hexdigest()},
              "stages": {"shadow": 0.0, "canary": 0.5, "enforce": 1.0}, "server_args": TINY_SERVER_FLAGS[:2]}
    (tmp_path / "fleet.json").write_text(json.dumps(config))
    env = {**os.environ, "TOKENWISE_CACHE": str(tmp_path / "cache")}
    yield env, tmp_path / "fleet.json", config
    subprocess.run([sys.executable, "-m", "tokenwise_safety.launch.fleet", "down"], env=env, timeout=300)


def test_a_pinned_sha_that_does_not_match_refuses_to_start(fleet_env):
    env, path, config = fleet_env
    path.write_text(json.dumps({**config, "probe": {**config["probe"], "sha256": "0" * 64}}))
    out = subprocess.run([sys.executable, "-m", "tokenwise_safety.launch.fleet", "up", "--config", str(path)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "the config pins 0000" in out.stderr


def test_staged_rollout_under_locust_load_drops_nothing(fleet_env, tmp_path):
    env, path, config = fleet_env
    state = run_fleet(env, "up", "--config", str(path))
    assert [r["mode"] for r in state["replicas"]] == ["shadow", "shadow"]
    router = state["router"]["url"]
    responses, counts = tmp_path / "responses.jsonl", tmp_path / "counts.json"
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", "-u", "4", "-r", "4",
         "-t", "600s", "--host", router],
        env={**env, "TOKENWISE_LOADTEST_RESPONSES": str(responses), "TOKENWISE_LOADTEST_COUNTS": str(counts),
             "TOKENWISE_LOADTEST_MAX_TOKENS": "8", "TOKENWISE_LOADTEST_MAX_PROMPT_CHARS": "300",
             "TOKENWISE_LOADTEST_LONG_TURNS": "2"},
        stdout=open(tmp_path / "locust.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for_responses(responses, lambda r: True)
        t_canary = time.time()
        assert [r["mode"] for r in run_fleet(env, "stage", "canary")["replicas"]] == ["enforce", "shadow"]
        state = run_fleet(env, "stage", "enforce")
        t_enforced = time.time()
        assert [r["mode"] for r in state["replicas"]] == ["enforce", "enforce"]
        wait_for_responses(responses, lambda r: r["started"] > t_enforced)
        t_rollback = time.time()
        state = run_fleet(env, "rollback")
        assert state["stage"] == "canary" and [r["mode"] for r in state["replicas"]] == ["enforce", "shadow"]
        time.sleep(5)
    finally:
        locust.send_signal(signal.SIGTERM)
        locust.wait(timeout=300)
    done = json.loads(counts.read_text())
    assert done["requests"] > 20 and done["failures"] == 0, done
    rows = [json.loads(line) for line in responses.read_text().splitlines()]
    # Locust writes its counts when it quits; a response finishing during the quit is in rows only
    assert done["responses"] <= len(rows) <= done["responses"] + 4
    # every response carries its replica's mode, and the mode fits the stage it ran under
    assert all(len(r["modes"]) == 1 and r["modes"][0] in ("shadow", "enforce") for r in rows)
    before = [r["modes"][0] for r in rows if r["finished"] < t_canary]
    enforced = [r["modes"][0] for r in rows if r["started"] > t_enforced and r["finished"] < t_rollback]
    assert before and set(before) == {"shadow"}
    assert enforced and set(enforced) == {"enforce"}
    status = run_fleet(env, "status")
    assert [r["info"]["mode"] for r in status["replicas"]] == ["enforce", "shadow"]
    assert all(r["info"]["probe_sha256"] == config["probe"]["sha256"] for r in status["replicas"])
    assert len(requests.get(router + "/workers", timeout=10).json()["workers"]) == 2


def test_a_replica_killed_under_load_loses_only_streams_it_had_started(fleet_env, tmp_path):
    """SIGKILL one of two replicas under Locust load (no drain): the router retries what
    the dead replica had not answered on the other one, so the only requests lost are
    streams that had already sent content (their bytes cannot be taken back)."""
    env, path, config = fleet_env
    state = run_fleet(env, "up", "--config", str(path))
    router, victim = state["router"]["url"], state["replicas"][0]
    responses, failures, counts = tmp_path / "responses.jsonl", tmp_path / "failures.jsonl", tmp_path / "counts.json"
    locust = subprocess.Popen(
        [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary", "-u", "6", "-r", "6",
         "-t", "600s", "--host", router],
        env={**env, "TOKENWISE_LOADTEST_RESPONSES": str(responses), "TOKENWISE_LOADTEST_FAILURES": str(failures),
             "TOKENWISE_LOADTEST_COUNTS": str(counts), "TOKENWISE_LOADTEST_MAX_TOKENS": "24",
             "TOKENWISE_LOADTEST_MAX_PROMPT_CHARS": "300", "TOKENWISE_LOADTEST_LONG_TURNS": "2"},
        stdout=open(tmp_path / "locust.log", "w"), stderr=subprocess.STDOUT)
    try:
        wait_for_responses(responses, lambda r: True, n=8)
        t_kill = time.time()
        os.killpg(victim["pid"], signal.SIGKILL)
        wait_for_responses(responses, lambda r: r["started"] > t_kill + 2, n=10)
    finally:
        locust.send_signal(signal.SIGTERM)
        locust.wait(timeout=300)
    done = json.loads(counts.read_text())
    lost = [json.loads(line) for line in failures.read_text().splitlines()] if failures.is_file() else []
    print(f"\nreplica killed under load: {done['requests']} requests, {len(lost)} lost: "
          + json.dumps([{k: f[k] for k in ("row", "streamed", "error")} for f in lost]))
    assert done["failures"] == len(lost)
    assert all(f["row"] == "chat stream" and f["streamed"] for f in lost), lost
    assert all(f["started"] < t_kill for f in lost), lost  # nothing sent after the kill failed

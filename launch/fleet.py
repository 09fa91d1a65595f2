"""A local fleet: SGLang replicas with the plugin behind the SGLang Model Gateway (`smg`,
pinned in pyproject: the router SGLang's docs point to, formerly sglang-router), on
127.0.0.1, with a staged rollout (shadow -> canary -> enforce) and rollback.

    python -m tokenwise_safety.launch.fleet up [--config launch/fleet.json]
    python -m tokenwise_safety.launch.fleet stage canary     # shadow | canary | enforce
    python -m tokenwise_safety.launch.fleet rollback         # back to the stage before
    python -m tokenwise_safety.launch.fleet status
    python -m tokenwise_safety.launch.fleet down

The config names the model, the replica count, the ports, the probe artifact with its
sha256 (checked before any replica starts; a mismatch stops the command), and each stage's
share of replicas in enforce mode. A stage change restarts only the replicas whose mode
changes, one at a time: taken out of the router, drained (SGLang finishes its in-flight
requests on SIGTERM), restarted in the new mode on the same port, checked on
/tokenwise/info, put back. The other replicas keep serving, so no request is dropped.
State (PIDs, ports, modes, stage history) lives in TOKENWISE_CACHE/fleet/state.json.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from tokenwise_safety import bundled
from tokenwise_safety.launch.server import Server, server_env

DEFAULT_CONFIG = Path(__file__).resolve().parent / "fleet.json"
DRAIN_SECONDS = 600  # SGLang drains in-flight requests on SIGTERM; then it is killed


class FleetError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"[tokenwise fleet] {msg}", file=sys.stderr, flush=True)


# --- config and state -------------------------------------------------------------------------

def load_config(path: Path) -> dict:
    config = json.loads(Path(path).read_text())
    missing = {"model", "replicas", "router_port", "first_port", "probe", "stages"} - set(config)
    if missing:
        raise FleetError(f"{path}: missing {sorted(missing)}")
    for stage, share in config["stages"].items():
        if not 0 <= share <= 1:
            raise FleetError(f"{path}: stage {stage!r} enforce share {share} is not in [0, 1]")
    return config


def probe_path(config: dict) -> Path:
    """The probe artifact, refused unless its sha256 is the config's."""
    probe = config["probe"]
    path = Path(probe.get("path") or bundled.probe_path(config["model"]))
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    if actual != probe["sha256"]:
        raise FleetError(f"probe {path} has sha256 {actual}, the config pins {probe['sha256']}: refusing to roll it out")
    return path


def model_path(config: dict) -> str:
    return config.get("model_path") or str(bundled.prepare(config["model"]))


def modes_for(config: dict, stage: str) -> list[str]:
    """Replica modes at a stage: the first ceil(share * n) replicas enforce, the rest shadow."""
    if stage not in config["stages"]:
        raise FleetError(f"unknown stage {stage!r}: the config has {list(config['stages'])}")
    n = config["replicas"]
    k = math.ceil(config["stages"][stage] * n - 1e-9)
    return ["enforce"] * k + ["shadow"] * (n - k)


def state_path() -> Path:
    return bundled.cache_dir() / "fleet" / "state.json"


def read_state() -> dict:
    if not state_path().is_file():
        raise FleetError("no fleet is up (start one with `python -m tokenwise_safety.launch.fleet up`)")
    return json.loads(state_path().read_text())


def write_state(state: dict) -> None:
    state_path().parent.mkdir(parents=True, exist_ok=True)
    tmp = state_path().with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_path())


# --- processes --------------------------------------------------------------------------------

def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def stop_group(pid: int, timeout: float = DRAIN_SECONDS) -> None:
    """SIGTERM a process group (SGLang drains its requests), SIGKILL what is left after `timeout`."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def start_replica(config: dict, model: str, probe: Path, mode: str, port: int) -> dict:
    logs = state_path().parent
    logs.mkdir(parents=True, exist_ok=True)
    server = Server(model, safety=["--safety-probe", str(probe), "--safety-mode", mode],
                    extra=["--enable-metrics", "--served-model-name", config.get("served_model_name", "default"),
                           *config.get("server_args", [])], port=port,
                    log_path=logs / f"replica-{port}.log", timeout=900,
                    dies_with_caller=False).start()  # outlives `fleet up`: the state file has its PID
    info = requests.get(server.url + "/tokenwise/info", timeout=30).json()
    if info["mode"] != mode or info["probe_sha256"] != config["probe"]["sha256"]:
        stop_group(server.proc.pid, 30)
        raise FleetError(f"replica {server.url} reports {info}, expected mode {mode} and the pinned probe")
    log(f"replica {server.url} up: {mode}, probe {info['probe_sha256'][:12]}, threshold {info['threshold']}")
    return {"port": port, "url": server.url, "pid": server.proc.pid, "mode": mode}


def start_router(config: dict, urls: list[str]) -> dict:
    port = config["router_port"]
    logf = open(state_path().parent / "router.log", "w")
    cmd = [sys.executable, "-m", "smg.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--policy", config.get("policy", "round_robin"), "--worker-urls", *urls]
    proc = subprocess.Popen(cmd, env=server_env(), stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FleetError(f"router exited with {proc.returncode}; see {logf.name}")
        try:
            if len(router_workers(url)) == len(urls):
                log(f"router {url} up, {len(urls)} workers")
                return {"port": port, "url": url, "pid": proc.pid}
        except requests.RequestException:
            pass
        time.sleep(1)
    stop_group(proc.pid, 10)
    raise FleetError(f"router not ready after 120 s; see {logf.name}")


# --- the router's worker API ------------------------------------------------------------------

def router_workers(router: str) -> list[dict]:
    r = requests.get(router + "/workers", timeout=10)
    r.raise_for_status()
    return r.json()["workers"]


def remove_worker(router: str, url: str) -> None:
    [worker] = [w for w in router_workers(router) if w["url"] == url]
    requests.delete(f"{router}/workers/{worker['id']}", timeout=30).raise_for_status()
    deadline = time.monotonic() + 60
    while any(w["url"] == url for w in router_workers(router)):
        if time.monotonic() > deadline:
            raise FleetError(f"router still lists {url} 60 s after its removal")
        time.sleep(0.2)


def add_worker(router: str, url: str) -> None:
    requests.post(router + "/workers", json={"url": url}, timeout=30).raise_for_status()
    deadline = time.monotonic() + 120
    while not any(w["url"] == url for w in router_workers(router)):
        if time.monotonic() > deadline:
            raise FleetError(f"router did not take {url} back within 120 s")
        time.sleep(0.5)


# --- commands ---------------------------------------------------------------------------------

def up(config_path: Path, stage: str) -> dict:
    if state_path().is_file() and any(alive(p) for p in _pids(json.loads(state_path().read_text()))):
        raise FleetError(f"a fleet is already up ({state_path()}): `fleet down` first")
    config = load_config(config_path)
    probe, model = probe_path(config), model_path(config)
    state = {"config": str(Path(config_path).resolve()), "stage": stage, "history": [stage], "replicas": []}
    try:
        for i, mode in enumerate(modes_for(config, stage)):
            state["replicas"].append(start_replica(config, model, probe, mode, config["first_port"] + i))
            write_state(state)
        state["router"] = start_router(config, [r["url"] for r in state["replicas"]])
    except BaseException:
        for pid in _pids(state):
            stop_group(pid, 30)
        state_path().unlink(missing_ok=True)
        raise
    write_state(state)
    return state


def set_stage(stage: str, record: bool = True) -> dict:
    """Restart, one at a time, the replicas whose mode differs at `stage`."""
    state = read_state()
    config = load_config(Path(state["config"]))
    probe, model = probe_path(config), model_path(config)
    router = state["router"]["url"]
    for replica, mode in zip(state["replicas"], modes_for(config, stage)):
        if replica["mode"] == mode:
            continue
        log(f"replica {replica['url']}: {replica['mode']} -> {mode} (drain, restart, rejoin)")
        remove_worker(router, replica["url"])
        stop_group(replica["pid"])
        try:
            replica.update(start_replica(config, model, probe, mode, replica["port"]))
        except (RuntimeError, TimeoutError, requests.RequestException) as e:
            write_state(state)
            raise FleetError(f"replica {replica['url']} did not come back in {mode} mode ({e}); the other "
                             f"replicas still serve: rerun `fleet stage {stage}` or `fleet rollback`") from None
        add_worker(router, replica["url"])
        write_state(state)
    state["stage"] = stage
    if record:
        state["history"].append(stage)
    write_state(state)
    return state


def rollback() -> dict:
    history = read_state()["history"]
    if len(history) < 2:
        raise FleetError("nothing to roll back to: the fleet has had one stage")
    state = set_stage(history[-2], record=False)
    state["history"] = history[:-1]
    write_state(state)
    return state


def status() -> dict:
    state = read_state()
    for replica in state["replicas"]:
        try:
            replica["info"] = requests.get(replica["url"] + "/tokenwise/info", timeout=10).json()
        except requests.RequestException as e:
            replica["info"] = {"error": str(e)}
    return state


def down() -> None:
    state = read_state()
    for pid in _pids(state):
        stop_group(pid, 60)
    state_path().unlink()
    log("fleet stopped")


def _pids(state: dict) -> list[int]:
    return [r["pid"] for r in state.get("replicas", [])] + ([state["router"]["pid"]] if "router" in state else [])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start the replicas and the router")
    p_up.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    p_up.add_argument("--stage", default="shadow")
    p_stage = sub.add_parser("stage", help="move the fleet to a stage")
    p_stage.add_argument("stage")
    sub.add_parser("rollback", help="move back to the stage before the last change")
    sub.add_parser("status", help="the fleet's state and each replica's /tokenwise/info")
    sub.add_parser("down", help="stop every replica and the router")
    args = ap.parse_args(argv)
    try:
        if args.command == "up":
            result = up(args.config, args.stage)
        elif args.command == "stage":
            result = set_stage(args.stage)
        elif args.command == "rollback":
            result = rollback()
        elif args.command == "status":
            result = status()
        else:
            down()
            return
    except (FleetError, RuntimeError, TimeoutError) as e:  # a replica or the router failed to start
        sys.exit(f"[tokenwise fleet] error: {e}")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

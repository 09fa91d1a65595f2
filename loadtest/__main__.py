"""Load-test plugin off / shadow / enforce servers of the same build with Locust, in one go.

    python -m tokenwise_safety.loadtest [--model smollm2] [--modes off,shadow,enforce]
        [--users 8] [--spawn-rate 2] [--run-time 2m] [--max-tokens 32] [--out loadtest/results/run]

Each mode in turn: a real SGLang server on 127.0.0.1 (one at a time: they would share the
CPU), Locust headless against it (loadtest/locustfile.py, bounded by users and run time,
stops by itself), the server stopped by PID. Writes Locust's CSVs (MODE_stats.csv,
MODE_stats_history.csv, ...), summary.json, summary.md and latency.png (latency
percentiles and requests/s over time per mode), and prints the table and the SLO check
(enforce p99 latency <= 1.1x off, no failed request).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from tokenwise_safety import bundled
from tokenwise_safety.launch.server import Server
from tokenwise_safety.loadtest import report

LOCUSTFILE = Path(__file__).resolve().parent / "locustfile.py"
MODES = ("off", "shadow", "enforce")


def safety_flags(mode: str, probe: str) -> list[str] | None:
    return None if mode == "off" else ["--safety-probe", probe, "--safety-mode", mode]


def run_mode(mode: str, model_path: str, probe: str, args, out: Path) -> dict:
    """One server, one Locust run; the mode's summary (report.summarise)."""
    print(f"[tokenwise loadtest] {mode}: starting the server", file=sys.stderr, flush=True)
    counts = out / f"{mode}_counts.json"
    with Server(model_path, safety=safety_flags(mode, probe), extra=args.server_arg,
                log_path=out / f"{mode}_server.log", timeout=900) as server:
        cmd = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
               "-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time,
               "--stop-timeout", "120", "--host", server.url, "--csv", str(out / mode), "--csv-full-history"]
        env = {**os.environ, "TOKENWISE_LOADTEST_COUNTS": str(counts),
               "TOKENWISE_LOADTEST_MAX_TOKENS": str(args.max_tokens),
               "TOKENWISE_LOADTEST_MAX_PROMPT_CHARS": str(args.max_prompt_chars),
               "TOKENWISE_LOADTEST_LONG_TURNS": str(args.long_turns)}
        print(f"[tokenwise loadtest] {mode}: {args.users} users for {args.run_time} against {server.url}",
              file=sys.stderr, flush=True)
        # Locust exits 1 when any request failed; the CSVs and counts say which.
        with open(out / f"{mode}_locust.log", "w") as log:
            done = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        dtype = server.dtype
    if not counts.is_file():
        sys.exit(f"[tokenwise loadtest] {mode}: Locust wrote no counts (exit {done.returncode}); "
                 f"see {out / f'{mode}_locust.log'}")
    return {**report.summarise(json.loads(counts.read_text())), "dtype": dtype}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=bundled.MODELS, default=bundled.DEFAULT_MODEL, help="bundled model to serve")
    ap.add_argument("--model-path", help="serve this HF folder instead of a bundled model (needs --probe)")
    ap.add_argument("--probe", help="probe artifact (default: the one shipped for --model)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma-separated, from off, shadow, enforce")
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--spawn-rate", type=float, default=2)
    ap.add_argument("--run-time", default="2m", help="per mode, Locust's syntax (90s, 10m)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-prompt-chars", type=int, default=0,
                    help="leave out longer prompts (0: none; for a model with a short context)")
    ap.add_argument("--long-turns", type=int, default=12, help="benign turns joined into one long prompt")
    ap.add_argument("--server-arg", action="append", default=[], help="extra flag for every server (repeatable)")
    ap.add_argument("--out", default="loadtest/results/run")
    args = ap.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        ap.error(f"unknown mode(s) {bad}: choose from {', '.join(MODES)}")
    if args.model_path and not args.probe:
        ap.error("--model-path needs --probe")
    model_path = args.model_path or str(bundled.prepare(args.model))
    probe = args.probe or str(bundled.probe_path(args.model))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    summaries = {mode: run_mode(mode, model_path, probe, args, out) for mode in modes}
    doc = {"model": args.model_path or args.model, "users": args.users, "run_time": args.run_time,
           "max_tokens": args.max_tokens, "cpu": report.cpu(),
           "dtype": ", ".join(sorted({s["dtype"] for s in summaries.values()})), "modes": summaries,
           "slo": report.slo(summaries)}
    (out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    table = report.markdown(doc)
    (out / "summary.md").write_text(table)
    report.plot({m: out / f"{m}_stats_history.csv" for m in modes}, out / "latency.png")
    print(table)
    print(f"[tokenwise loadtest] wrote {out}/summary.json, summary.md, latency.png and Locust's CSVs", file=sys.stderr)


if __name__ == "__main__":
    main()

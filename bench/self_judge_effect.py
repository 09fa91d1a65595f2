"""Self-judgment's effect on the eval harness: probe-only enforce vs probe + self-judge, same run.

    python bench/self_judge_effect.py [--model qwen-1.5b] [--limit 12] [--band LOW,HIGH] [--out reports/self-judge-effect]

Serves the bundled model with its shipped probe in enforce mode, without and then with
--safety-self-judge on (one server at a time: two 1.5B servers do not fit 24 GB), and runs
tokenwise_safety.eval against each (same cases, same seed, one report per target):
false interventions on the everyday and borderline-benign suites, harmful compliance by
refusal keywords on the harmful suites. Without --band the server's own default band is
used, which comes from the probe's calibration record, not from any eval set: the spread of
its leave-one-source-out fold thresholds and the served threshold (0.9905-0.997 for
Qwen2.5-Coder-1.5B), where the calibrated boundary itself is uncertain
(self_judge.calibration_band; the README's first run used --band 0.99,1). The question and
verdict threshold are the launch defaults (chosen on DEV rows, bench/self_judge_question.py).
"""
from __future__ import annotations

import argparse

from tokenwise_safety import bundled, eval as harness
from tokenwise_safety.launch.server import Server

SUITES = "advbench,jailbreak,prefill,benign,borderline"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen-1.5b")
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--band", default=None, help="LOW,HIGH (default: the server's, from the probe's record)")
    ap.add_argument("--every", type=int, default=16)
    ap.add_argument("--suites", default=SUITES)
    ap.add_argument("--out", default="reports/self-judge-effect")
    args = ap.parse_args(argv)
    model = bundled.prepare(args.model)
    base = ["--safety-probe", str(bundled.probe_path(args.model)), "--safety-mode", "enforce",
            "--safety-trace-detail", "full"]
    judge = ["--safety-self-judge", "on", "--safety-judge-every", str(args.every),
             *(["--safety-judge-band", args.band] if args.band else [])]
    for name, flags in (("probe_only", base), ("self_judge", base + judge)):
        with Server(model, safety=flags, log_path=f"/tmp/tokenwise-effect-{name}.log") as server:
            harness.main(["--target", f"{name}={server.url}", "--suites", args.suites, "--limit", str(args.limit),
                          "--throughput-rounds", "0", "--out", f"{args.out}-{name}"])


if __name__ == "__main__":
    main()

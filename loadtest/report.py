"""Summary, SLO check, table and plot of a load test (python -m tokenwise_safety.loadtest)."""
from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

SLO_P99_RATIO = 1.1  # enforce p99 latency at most this times off's, at the same load


def summarise(counts: dict) -> dict:
    """A mode's figures from the counts the locustfile wrote at the end of its run."""
    tokens, seconds = counts["completion_tokens"], counts["seconds"]
    return {
        "requests": counts["requests"], "failures": counts["failures"],
        "rps": round(counts["requests"] / seconds, 3) if seconds else 0.0,
        "latency_ms": counts["latency_ms"], "ttft_ms": counts["ttft_ms"], "itl_ms": counts["itl_ms"],
        "completion_tokens_per_s": round(tokens / seconds, 2) if seconds else 0.0,
        "interventions_per_1k_tokens": (round(1000 * counts["interventions"] / tokens, 3)
                                        if tokens and counts["with_trace"] else None),  # None: no trace (plugin off)
        "responses_with_trace": counts["with_trace"], "responses": counts["responses"],
    }


def slo(modes: dict) -> dict:
    """Enforce p99 latency <= SLO_P99_RATIO x off's, and no failed request in any mode."""
    out = {"failures": sum(m["failures"] for m in modes.values())}
    off, enforce = modes.get("off"), modes.get("enforce")
    if off and enforce and off["latency_ms"].get("p99") and enforce["latency_ms"].get("p99"):
        out["enforce_p99_over_off"] = round(enforce["latency_ms"]["p99"] / off["latency_ms"]["p99"], 3)
        out["p99_ok"] = out["enforce_p99_over_off"] <= SLO_P99_RATIO
    out["passed"] = out["failures"] == 0 and out.get("p99_ok", False)
    return out


def _fmt(d: dict, keys) -> str:
    return " / ".join(f"{d[k]:.0f}" if k in d else "-" for k in keys)


def markdown(doc: dict) -> str:
    lines = [f"Model {doc['model']}, {doc['users']} users, {doc['run_time']} per mode, "
             f"{doc['max_tokens']} max tokens; {doc['cpu']}, {doc['dtype']}",
             "",
             "| mode | requests | failed | req/s | latency p50/p95/p99 ms | TTFT p50/p95/p99 ms | ITL p50/p99 ms "
             "| completion tok/s | interventions / 1k tokens |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, m in doc["modes"].items():
        lines.append(f"| {mode} | {m['requests']} | {m['failures']} | {m['rps']} | "
                     f"{_fmt(m['latency_ms'], ('p50', 'p95', 'p99'))} | {_fmt(m['ttft_ms'], ('p50', 'p95', 'p99'))} | "
                     f"{_fmt(m['itl_ms'], ('p50', 'p99'))} | {m['completion_tokens_per_s']} | "
                     f"{'-' if m['interventions_per_1k_tokens'] is None else m['interventions_per_1k_tokens']} |")
    s = doc["slo"]
    ratio = s.get("enforce_p99_over_off")
    lines += ["", f"SLO (enforce p99 <= {SLO_P99_RATIO}x off, 0 failed): "
                  f"{'PASS' if s['passed'] else 'FAIL'} (p99 ratio {ratio if ratio is not None else 'n/a'}, "
                  f"{s['failures']} failed)"]
    return "\n".join(lines) + "\n"


def history(path: Path) -> dict:
    """From a Locust stats history CSV: per second, chat requests/s (every POST row) and the
    p50/p95 latency of the benign chat row (Locust's current-window percentiles)."""
    rps, p50, p95 = defaultdict(float), {}, {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["Type"] != "POST":
                continue
            t = int(row["Timestamp"])
            rps[t] += float(row["Requests/s"] or 0)
            if row["Name"] == "chat benign" and row["50%"] not in ("", "N/A", "0"):
                p50[t], p95[t] = float(row["50%"]), float(row["95%"])
    start = min(rps) if rps else 0
    shift = lambda d: ([t - start for t in sorted(d)], [d[t] for t in sorted(d)])  # noqa: E731
    return {"rps": shift(rps), "p50": shift(p50), "p95": shift(p95)}


def plot(histories: dict[str, Path], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (lat, thr) = plt.subplots(2, 1, figsize=(9, 7), sharex=True)
    for mode, path in histories.items():
        h = history(path)
        line, = lat.plot(*h["p50"], label=f"{mode} p50")
        lat.plot(*h["p95"], linestyle="--", color=line.get_color(), label=f"{mode} p95")
        thr.plot(*h["rps"], color=line.get_color(), label=mode)
    lat.set_ylabel("benign chat latency (ms)")
    thr.set_ylabel("chat requests/s")
    thr.set_xlabel("seconds into the run")
    lat.legend(fontsize=8)
    thr.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def cpu() -> str:
    from tokenwise_safety.launch.server import cpu_info
    name, flags = cpu_info()
    return f"{name} ({'AVX-512 bf16' if 'avx512_bf16' in flags else 'no AVX-512 bf16'})"

"""Prometheus metrics, created lazily in the process that records them.

SGLang exports metrics from every process through prometheus_client's multiprocess
collector; metrics must therefore be created after PROMETHEUS_MULTIPROC_DIR is set,
i.e. in the child process on first use, not at import.
"""
from __future__ import annotations

import functools

import numpy as np

SCORE_BUCKETS = (0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


@functools.cache
def _metrics():
    from prometheus_client import Counter, Histogram
    return {
        "scores": Histogram("tokenwise_safety_token_harm_score",
                            "Probe P(harmful) of every scored decoding position",
                            buckets=SCORE_BUCKETS),
        "flagged": Counter("tokenwise_safety_flagged_requests",
                           "Finished requests with at least one position at or over the threshold"),
        # origin: "operator" (the launch policy) or "client" (a request that tightened it);
        # a client asking for a tiny threshold must not inflate the operator's figures.
        "vetoes": Counter("tokenwise_safety_vetoes", "Pending tokens vetoed and re-drawn", ["origin"]),
        "pivots": Counter("tokenwise_safety_pivots", "Safe pivots steered in", ["origin"]),
        "untrusted_policies": Counter(
            "tokenwise_safety_untrusted_policies",
            "Requests whose policy reached the scheduler unvalidated or malformed; the operator's policy was used"),
        "errors": Counter("tokenwise_safety_errors",
                          "Requests hit by a failed scoring or enforcement step", ["action"]),
        "finishes": Counter("tokenwise_safety_finishes",
                            "Requests the plugin ended itself", ["reason"]),
        "draft_vetoes": Counter("tokenwise_safety_draft_vetoes",
                                "Speculative draft tokens vetoed at verify (drawn or not)", ["origin"]),
        "draft_reranks": Counter("tokenwise_safety_draft_reranks",
                                 "Draft tree nodes the draft model's probe flagged, their children ranked "
                                 "down (harmless-first drafting)"),
        "accept_length": Histogram("tokenwise_safety_spec_accept_length",
                                   "Tokens committed per speculative verify step under the plugin",
                                   buckets=(1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)),
        "probe_seconds": Histogram("tokenwise_safety_probe_seconds",
                                   "Host time of the probe per forward step (whole batch)",
                                   buckets=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1)),
        # effect: what the verdict did to the probe's decision (confirmed, cancelled,
        # triggered, none), "shadow" (recorded only), "unavailable" (no room for the fork) or
        # "error" (the pass failed; the probe decided alone).
        "judge_calls": Counter("tokenwise_safety_judge_calls", "Self-judgment passes, by effect", ["effect"]),
        "judge_tokens": Counter("tokenwise_safety_judge_tokens",
                                "Tokens computed by self-judgment passes (the suffix, plus at most one page)"),
        "judge_seconds": Histogram("tokenwise_safety_judge_seconds",
                                   "Host time of one batched self-judgment pass",
                                   buckets=(1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0)),
    }


def observe_scores(scores: list[float]) -> None:
    """Add a batch of scores to the histogram with one update per bucket, not per score.

    prometheus_client has no bulk observe; its Histogram keeps one counter per bucket
    (non-cumulative) plus a sum, which is what we update.
    """
    hist = _metrics()["scores"]
    edges = np.asarray(hist._upper_bounds)
    counts = np.bincount(np.searchsorted(edges, np.asarray(scores), side="left"),
                         minlength=len(edges))
    for bucket, count in zip(hist._buckets, counts):
        if count:
            bucket.inc(int(count))
    hist._sum.inc(float(np.sum(scores)))


def observe_probe_seconds(seconds: float) -> None:
    _metrics()["probe_seconds"].observe(seconds)


def count_draft_vetoes(n: int, origin: str = "operator") -> None:
    if n:
        _metrics()["draft_vetoes"].labels(origin=origin).inc(n)


def count_draft_reranks(n: int) -> None:
    if n:
        _metrics()["draft_reranks"].inc(n)


def observe_accept_lengths(lengths: list[int]) -> None:
    histogram = _metrics()["accept_length"]
    for n in lengths:
        histogram.observe(n)


def count_flagged_request() -> None:
    _metrics()["flagged"].inc()


def count_veto(origin: str = "operator") -> None:
    _metrics()["vetoes"].labels(origin=origin).inc()


def count_pivot(origin: str = "operator") -> None:
    _metrics()["pivots"].labels(origin=origin).inc()


def count_untrusted_policy() -> None:
    _metrics()["untrusted_policies"].inc()


def count_errors(action: str, n: int = 1) -> None:
    """action: 'fail_closed' or 'fail_open' (--safety-on-error)."""
    _metrics()["errors"].labels(action=action).inc(n)


def count_judge(effect: str, n: int = 1) -> None:
    _metrics()["judge_calls"].labels(effect=effect).inc(n)


def count_judge_tokens(n: int) -> None:
    _metrics()["judge_tokens"].inc(n)


def observe_judge_seconds(seconds: float) -> None:
    _metrics()["judge_seconds"].observe(seconds)


def count_finish(reason: str) -> None:
    """A request the plugin ended: 'grammar' (the pivot could not satisfy it), 'second_pivot',
    'error' (fail-closed)."""
    _metrics()["finishes"].labels(reason=reason).inc()


def publish_info(info: dict) -> None:
    """tokenwise_safety_info{version, probe_sha256, mode, threshold, ...} 1: what this replica
    runs (an info metric as a gauge: the multiprocess collector has no Info type)."""
    from prometheus_client import Gauge

    from tokenwise_safety.info import INFO_FIELDS
    gauge = Gauge("tokenwise_safety_info", "Plugin version, probe artifact sha256, mode and threshold of this replica",
                  list(INFO_FIELDS), multiprocess_mode="max")
    gauge.labels(*(str(info[k]) for k in INFO_FIELDS)).set(1)


def sample_total(exposition: str, name: str, **labels: str) -> float:
    """Sample `name` of a /metrics page (prometheus_client's own parser), summed over the label
    sets that carry `labels`, for benches and tests that read counters from a running server.
    0.0 when the page has no such sample: the multiprocess collector shows a labelled counter
    only after its first increment. A label set written into the name would always read 0.0,
    so it is refused."""
    if "{" in name or "}" in name:
        raise ValueError(f"{name!r}: pass labels as keyword arguments, not in the sample name")
    from prometheus_client.parser import text_string_to_metric_families
    return sum(s.value for family in text_string_to_metric_families(exposition) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

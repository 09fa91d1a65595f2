"""Locust users for a tokenwise-safety server, through the OpenAI endpoints.

    locust -f loadtest/locustfile.py --headless -u 8 -r 2 -t 2m --host http://127.0.0.1:30000

User classes (weights are Locust's `weight`): benign chat (everyday and ShareGPT turns),
a harmful / jailbreak-wrapped mix, streaming chat (time to first token and inter-token
latency read from the stream, reported as their own Locust rows "TTFT" and "ITL"), and
long prompts. Every prompt is a held-out one (datasets.is_heldout), as in the eval harness.

Besides Locust's own CSVs, each process adds up completion tokens and interventions (from
the harm trace in `metadata.tokenwise_safety`) and writes them as JSON at the end to
$TOKENWISE_LOADTEST_COUNTS, if set.
"""
from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, events, task

MAX_TOKENS = int(os.environ.get("TOKENWISE_LOADTEST_MAX_TOKENS", "32"))
MAX_PROMPT_CHARS = int(os.environ.get("TOKENWISE_LOADTEST_MAX_PROMPT_CHARS", "0"))  # 0: no cap
LONG_TURNS = int(os.environ.get("TOKENWISE_LOADTEST_LONG_TURNS", "12"))  # benign turns per long prompt
COUNTS = {"completion_tokens": 0, "interventions": 0, "responses": 0, "with_trace": 0}
_PROMPTS: dict[str, list[str]] = {}


def prompts() -> dict[str, list[str]]:
    """Held-out prompts per workload, built once per process from the eval harness's suites
    (prompts longer than MAX_PROMPT_CHARS left out, for models with a short context)."""
    if not _PROMPTS:
        from tokenwise_safety import eval as harness
        suites = harness.build_suites(limit=0)
        fits = lambda p: not MAX_PROMPT_CHARS or len(p) <= MAX_PROMPT_CHARS  # noqa: E731
        _PROMPTS["benign"] = [c["request"] for c in suites["benign"] + suites["sharegpt"] if fits(c["request"])]
        _PROMPTS["harmful"] = [c["request"] for s in ("advbench", "harmbench", "scorer", "jailbreak")
                               for c in suites[s] if fits(c["request"])]
        # a document to summarise, made of benign turns (~1.5k tokens at 12 turns)
        docs = _PROMPTS["benign"]
        _PROMPTS["long"] = ["Summarise the following notes in two sentences.\n\n" +
                            "\n\n".join(random.Random(i).sample(docs, LONG_TURNS)) for i in range(20)]
    return _PROMPTS


RESPONSES = os.environ.get("TOKENWISE_LOADTEST_RESPONSES")  # JSONL: each response's times and trace modes
FAILURES = os.environ.get("TOKENWISE_LOADTEST_FAILURES")  # JSONL: each failed request, and whether it had streamed


def fail(r, row: str, started: float, why: str, streamed: bool = False) -> None:
    """Mark a request failed in Locust and, when asked, record it (fault tests tell a lost
    stream that had started from a request that was never served)."""
    r.failure(why)
    if FAILURES:
        with open(FAILURES, "a") as f:
            f.write(json.dumps({"row": row, "started": started, "finished": time.time(), "error": why[:300],
                                "streamed": streamed}) + "\n")


def count(body: dict, started: float) -> None:
    """Tokens and interventions of one finished chat completion (non-streamed or last chunk)."""
    if RESPONSES:
        modes = [t.get("mode") for t in (body.get("metadata") or {}).get("tokenwise_safety") or []]
        with open(RESPONSES, "a") as f:
            f.write(json.dumps({"started": started, "finished": time.time(), "modes": modes}) + "\n")
    COUNTS["responses"] += 1
    COUNTS["completion_tokens"] += (body.get("usage") or {}).get("completion_tokens", 0)
    trace = (body.get("metadata") or {}).get("tokenwise_safety")
    if trace:
        COUNTS["with_trace"] += 1
        COUNTS["interventions"] += sum(len(t.get("interventions") or []) for t in trace)


def merged(stats, method: str):
    """One Locust StatsEntry over every row of `method` (POST: every chat request)."""
    from locust.stats import StatsEntry
    total = StatsEntry(stats, method, method)
    for entry in stats.entries.values():
        if entry.method == method:
            total.extend(entry)
    return total


def percentiles(entry, qs=(0.5, 0.95, 0.99)) -> dict:
    if not entry.num_requests:
        return {}
    return {f"p{round(q * 100)}": entry.get_response_time_percentile(q) for q in qs}


@events.quitting.add_listener
def _write_counts(environment, **_):
    path = os.environ.get("TOKENWISE_LOADTEST_COUNTS")
    if not path:
        return
    chat = merged(environment.stats, "POST")
    seconds = max(chat.last_request_timestamp - chat.start_time, 1e-9) if chat.num_requests else 0
    with open(path, "w") as f:
        json.dump({**COUNTS, "requests": chat.num_requests, "failures": chat.num_failures,
                   "seconds": round(seconds, 2), "latency_ms": percentiles(chat),
                   "ttft_ms": percentiles(merged(environment.stats, "TTFT")),
                   "itl_ms": percentiles(merged(environment.stats, "ITL"), (0.5, 0.99))}, f)


def chat_body(prompt: str, stream: bool = False) -> dict:
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}],
            "max_tokens": MAX_TOKENS, "temperature": 0}
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    return body


class _Chat(HttpUser):
    """One non-streamed chat request per task; subclasses name the workload and the row."""
    abstract = True
    wait_time = between(0.5, 1.5)
    workload, row = "benign", "chat benign"

    @task
    def chat(self) -> None:
        prompt = random.choice(prompts()[self.workload])
        started = time.time()
        with self.client.post("/v1/chat/completions", json=chat_body(prompt), name=self.row,
                              catch_response=True) as r:
            if r.status_code != 200:
                fail(r, self.row, started, f"HTTP {r.status_code}: {r.text[:200]}")
                return
            count(r.json(), started)
            r.success()


class BenignChat(_Chat):
    weight = 4


class HarmfulMix(_Chat):
    weight = 2
    workload, row = "harmful", "chat harmful/jailbreak"


class LongPrompt(_Chat):
    weight = 1
    workload, row = "long", "chat long prompt"


class StreamingChat(HttpUser):
    weight = 2
    wait_time = between(0.5, 1.5)

    @task
    def stream(self):
        prompt = random.choice(prompts()["benign"])
        started, start = time.time(), time.perf_counter()
        first = last = None
        gaps, final = [], {}
        with self.client.post("/v1/chat/completions", json=chat_body(prompt, stream=True), name="chat stream",
                              stream=True, catch_response=True) as r:
            if r.status_code != 200:
                fail(r, "chat stream", started, f"HTTP {r.status_code}: {r.text[:200]}")
                return
            try:
                for line in r.iter_lines():
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if chunk.get("usage"):
                        final["usage"] = chunk["usage"]
                    if chunk.get("metadata"):
                        final["metadata"] = chunk["metadata"]
                    if any((c.get("delta") or {}).get("content") for c in chunk.get("choices") or []):
                        now = time.perf_counter()
                        if first is None:
                            first = now
                        else:
                            gaps.append(now - last)
                        last = now
            except Exception as e:  # noqa: BLE001 (a broken stream, whatever broke it, is this request's failure)
                fail(r, "chat stream", started, f"stream broken: {e!r}", streamed=first is not None)
                return
            if first is None:
                fail(r, "chat stream", started, "stream ended without content")
                return
            count(final, started)
            r.success()
        fire = self.environment.events.request.fire
        fire(request_type="TTFT", name="chat stream", response_time=(first - start) * 1000, response_length=0,
             exception=None, context={})
        for gap in gaps:
            fire(request_type="ITL", name="chat stream", response_time=gap * 1000, response_length=0,
                 exception=None, context={})

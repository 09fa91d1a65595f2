"""Seam: the output streamer. Never emits an enforced request's pending (uncommitted)
token."""
from __future__ import annotations

from .enforce import state_of

STREAM_OUTPUT = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output"


def around_stream_output(original, streamer, reqs, *args, **kwargs):
    """Hold back each enforced request's pending (uncommitted) token."""
    held = []
    for req in reqs:
        st = state_of(req)
        if st is not None and st.policy.enforce and not req.finished() and req.output_ids:
            held.append((req, req.output_ids.pop()))
    try:
        return original(streamer, reqs, *args, **kwargs)
    finally:
        for req, tok in held:
            req.output_ids.append(tok)

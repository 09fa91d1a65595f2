"""Seam: the output streamer. Never emits an enforced request's pending (uncommitted)
token, nor, while a finish is held for that token's score, anything past the finish (a
speculative run can cross max_new_tokens; SGLang trims it once the request finishes)."""
from __future__ import annotations

from .enforce import state_of

STREAM_OUTPUT = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output"


def around_stream_output(original, streamer, reqs, *args, **kwargs):
    """Hold back each enforced request's uncommitted tail."""
    held = []
    for req in reqs:
        st = state_of(req)
        if st is not None and st.policy.enforce and not req.finished() and req.output_ids:
            keep = len(req.output_ids) - 1
            if st.deferred_finish is not None and st.deferred_finish[1] is not None:
                keep = min(keep, st.deferred_finish[1])
            held.append((req, list(req.output_ids[keep:])))
            del req.output_ids[keep:]
    try:
        return original(streamer, reqs, *args, **kwargs)
    finally:
        for req, tail in held:
            req.output_ids.extend(tail)

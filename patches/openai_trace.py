"""Seam: the OpenAI-compatible endpoints. Returns the harm trace in `metadata`.

Non-streaming: AFTER hooks on the response builders set
`metadata["tokenwise_safety"] = [trace per choice]`. Streaming: AROUND hooks on the stream
generators send one extra chunk before `data: [DONE]` whose `metadata` carries the same
list (the OpenAI chunk schema has no field for it; clients read it as an extra field).
"""
from __future__ import annotations

import json

from tokenwise_safety.trace import SUMMARY_KEY

from .meta_info import LAST_META_ATTR, trace_of

CHAT_RESPONSE = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._build_chat_response"
COMPLETION_RESPONSE = ("sglang.srt.entrypoints.openai.serving_completions."
                       "OpenAIServingCompletion._build_completion_response")
CHAT_STREAM = "sglang.srt.entrypoints.openai.serving_chat.OpenAIServingChat._generate_chat_stream"
COMPLETION_STREAM = ("sglang.srt.entrypoints.openai.serving_completions."
                     "OpenAIServingCompletion._generate_completion_stream")
DONE = "data: [DONE]\n\n"


def _traces(meta_infos: list[dict]) -> list | None:
    traces = [trace_of(m or {}) for m in meta_infos]
    return traces if any(t is not None for t in traces) else None


def after_build_response(response, serving, request, ret, created, *a, **kw):
    traces = _traces([r.get("meta_info") for r in ret])
    if traces is not None and hasattr(response, "metadata"):
        response.metadata = {**(response.metadata or {}), SUMMARY_KEY: traces}
    return response


def around_stream(original, serving, adapted_request, request, raw_request, *a, **kw):
    object_type = "chat.completion.chunk" if "chat" in type(serving).__name__.lower() \
        else "text_completion"

    async def stream():
        chunk_id = None
        async for chunk in original(serving, adapted_request, request, raw_request, *a, **kw):
            if chunk == DONE:
                last = getattr(adapted_request, LAST_META_ATTR, {})
                traces = _traces([last[i] for i in sorted(last)])
                if traces is not None:
                    payload = {"id": chunk_id, "object": object_type, "choices": [],
                               "metadata": {SUMMARY_KEY: traces}}
                    yield f"data: {json.dumps(payload)}\n\n"
            elif chunk_id is None and chunk.startswith("data: {"):
                chunk_id = json.loads(chunk[6:]).get("id")
            yield chunk
    return stream()

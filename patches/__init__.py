"""SGLang seams of the tokenwise safety plugin, one module per seam.

`register` is the `sglang.srt.plugins` entry point. SGLang calls it in every process
(launcher, scheduler, detokenizer) and may call it more than once: it is idempotent.
Hooks are inert unless the server was launched with --safety-plugin, except
cpu_verify_attention and cpu_draft_attention, which give the CPU engine the speculative
verify and draft attention it lacks, and cpu_packed_linear, which makes its few-row
matmuls (verify, draft extend, batched decode) cost about one row's. harmless_draft's hooks are registered later, only in
the process that loads a draft model with --safety-draft-probe (importing SGLang's EAGLE
worker everywhere would slow and clutter every launch).
"""
from __future__ import annotations

from . import (cpu_draft_attention, cpu_packed_linear, cpu_verify_attention, held_finish, held_stream, info_route, layer_capture, meta_info, openai_policy, openai_trace, parent_capture,
               retraction, rollback, server_args, spec_verify, trace_entries, worker_scoring)

_HOOKS = (
    (server_args.ADD_CLI_ARGS, server_args.add_cli_args, "AFTER"),
    (server_args.FROM_CLI_ARGS, server_args.from_cli_args, "AFTER"),
    (info_route.LAUNCH, info_route.before_launch_server, "BEFORE"),
    (layer_capture.LOAD_MODEL, layer_capture.after_load_model, "AFTER"),
    (cpu_packed_linear.ALLOC_MEMORY_POOL, cpu_packed_linear.after_alloc_memory_pool, "AFTER"),
    (cpu_packed_linear.LINEAR_APPLY, cpu_packed_linear.around_linear_apply, "AROUND"),
    (cpu_packed_linear.LM_HEAD, cpu_packed_linear.around_compute_lm_head, "AROUND"),
    (worker_scoring.TARGET, worker_scoring.before_forward, "BEFORE"),
    (worker_scoring.TARGET, worker_scoring.after_forward, "AFTER"),
    (worker_scoring.TARGET, spec_verify.before_verify_forward, "BEFORE"),
    (spec_verify.VERIFY, spec_verify.around_eagle_sample, "AROUND"),
    (cpu_verify_attention.FORWARD_EXTEND, cpu_verify_attention.around_forward_extend, "AROUND"),
    (cpu_draft_attention.CREATE_DECODE_BACKEND, cpu_draft_attention.around_create_decode_backend, "AROUND"),
    (cpu_draft_attention.CREATE_DRAFT_EXTEND_BACKEND, cpu_draft_attention.around_create_draft_extend_backend, "AROUND"),
    (parent_capture.SAMPLER_PREPROCESS, parent_capture.after_sampler_preprocess, "AFTER"),
    (rollback.UPDATE_CACHE, rollback.after_update_cache, "AFTER"),
    (trace_entries.COLLECT_INFO, trace_entries.after_collect_info, "AFTER"),
    (held_finish.UPDATE_FINISH, held_finish.around_update_finish, "AROUND"),
    (held_stream.STREAM_OUTPUT, held_stream.around_stream_output, "AROUND"),
    (retraction.RELEASE_REQ, retraction.before_release_req, "BEFORE"),
    (meta_info.UPDATE_META, meta_info.after_update_meta, "AFTER"),
    (meta_info.GENERATE, meta_info.around_generate, "AROUND"),
    (openai_policy.HANDLE_REQUEST, openai_policy.around_handle_request, "AROUND"),
    (openai_trace.CHAT_RESPONSE, openai_trace.after_build_response, "AFTER"),
    (openai_trace.COMPLETION_RESPONSE, openai_trace.after_build_response, "AFTER"),
    (openai_trace.CHAT_STREAM, openai_trace.around_stream, "AROUND"),
    (openai_trace.COMPLETION_STREAM, openai_trace.around_stream, "AROUND"),
)


def register() -> None:
    register_hooks(_HOOKS)


def register_hooks(hooks) -> None:
    """Register (target, hook, kind) triples with SGLang's HookRegistry, each once."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook, kind in hooks:
        already = any(h is hook for _, h, *_ in HookRegistry._hooks.get(target, []))
        if not already:
            HookRegistry.register(target, hook, HookType[kind])

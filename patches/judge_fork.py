"""The judge pass on a fork of live requests' KV (not a seam itself: patches/enforce.py
calls it from the worker's forward seam, right after the step's scores are known).

SGLang puts decode-step KV into the radix tree only when a request finishes, so a second
request would recompute the partial answer. The fork does what the beam-search fork
(srt/beam_search/fork.py) does: a fresh req_to_token row aliases the live row's slots
(prompt + partial answer, whole pages) without copying KV, and only the judge suffix (plus
the live row's partly filled last page, recomputed into the fork's own page) is computed,
in one batched EXTEND forward for every request judged this step. The fork's rows and
slots are freed before this returns, whatever happens, so the live request's cache,
output and logprobs never see it; the scheduler's own pools stay as they were.
"""
from __future__ import annotations

import copy

import torch


class JudgeUnavailable(RuntimeError):
    """No free request row or KV slots for the fork this step (the probe decides alone)."""


def run(worker, batch, rows: list[int], suffix: list[int]) -> tuple[torch.Tensor, list[int]]:
    """Next-token logits after prompt + partial answer + suffix for each batch row in
    `rows`: ([len(rows), vocab], tokens computed per row)."""
    runner = worker.model_runner
    pool, alloc = runner.req_to_token_pool, runner.token_to_kv_pool_allocator
    page = getattr(alloc, "page_size", 1)
    reqs = [batch.reqs[i] for i in rows]
    lens = [int(batch.seq_lens_cpu[i]) for i in rows]
    kept = [n - n % page for n in lens]  # aliased: whole pages of the live row
    extend = [_fill_ids(req, n)[k:n] + list(suffix) for req, n, k in zip(reqs, lens, kept)]
    sizes = [len(e) for e in extend]
    fork_rows = pool.alloc_rows(len(rows))
    if fork_rows is None:
        raise JudgeUnavailable("no free request row")
    slots = alloc.alloc(sum(-(-s // page) * page for s in sizes))
    if slots is None:
        pool.free_rows(fork_rows)
        raise JudgeUnavailable("no free KV slots")
    try:
        out_loc = _map_rows(pool.req_to_token, batch.req_pool_indices[rows], fork_rows, kept, sizes, slots, page)
        forward_batch = _forward_batch(batch, runner, reqs, fork_rows, kept, extend, out_loc)
        logits = runner.forward(forward_batch).logits_output.next_token_logits
    finally:
        alloc.free(slots)
        pool.free_rows(fork_rows)
    return logits, sizes


def _fill_ids(req, n: int) -> list[int]:
    """The first n tokens whose KV the live row holds (prompt, then output)."""
    ids = list(req.origin_input_ids[:n])
    return ids + list(req.output_ids[: n - len(ids)])


def _map_rows(req_to_token, live_rows, fork_rows, kept, sizes, slots, page) -> torch.Tensor:
    """Alias each live row's first kept[r] slots into its fork row, then give the fork row
    its own slots (page-aligned per row) for the tokens it computes; returns them in
    batch order (the forward's out_cache_loc)."""
    device = req_to_token.device
    fork = torch.tensor(fork_rows, dtype=torch.long, device=device)
    width = max(kept)
    if width:
        req_to_token[fork, :width] = req_to_token[live_rows.to(device), :width]
    starts = torch.tensor([0] + [-(-s // page) * page for s in sizes[:-1]], device=device).cumsum(0)
    size_t = torch.tensor(sizes, device=device)
    within = torch.arange(int(size_t.sum()), device=device) - torch.repeat_interleave(size_t.cumsum(0) - size_t, size_t)
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=device), size_t)
    out_loc = slots.to(device)[starts[owner] + within]
    cols = torch.tensor(kept, device=device)[owner] + within
    req_to_token[fork[owner], cols] = out_loc.to(req_to_token.dtype)
    return out_loc


def _forward_batch(batch, runner, reqs, fork_rows, kept, extend, out_loc):
    """An EXTEND ForwardBatch over the fork rows, built from a copy of the live batch
    (the live ScheduleBatch itself is not touched)."""
    from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode, ForwardBatch, ForwardMode

    device = out_loc.device
    seq = [k + len(e) for k, e in zip(kept, extend)]
    fork = copy.copy(batch)
    fork.reqs = reqs
    fork.forward_mode = ForwardMode.EXTEND
    fork.input_ids = torch.tensor([t for e in extend for t in e], dtype=torch.long, device=device)
    fork.req_pool_indices = torch.tensor(fork_rows, dtype=torch.long, device=device)
    fork.seq_lens_cpu = torch.tensor(seq, dtype=torch.int64)
    fork.seq_lens = fork.seq_lens_cpu.to(device)
    fork.orig_seq_lens = fork.seq_lens_cpu.to(device=device, dtype=torch.int32)
    fork.seq_lens_sum = sum(seq)
    fork.out_cache_loc = out_loc
    fork.prefix_lens, fork.extend_lens = list(kept), [len(e) for e in extend]
    fork.extend_num_tokens = sum(fork.extend_lens)
    fork.extend_logprob_start_lens = list(fork.extend_lens)
    fork.return_logprob, fork.top_logprobs_nums, fork.token_ids_logprobs = False, None, None
    fork.sampling_info, fork.spec_info = None, None
    fork.multimodal_inputs = [None] * len(reqs)
    fork.input_embeds = fork.replace_embeds = fork.replace_positions = None
    fork.decoding_reqs, fork.extend_input_logprob_token_ids = None, None
    fork.is_extend_in_batch, fork.can_run_decode_cuda_graph = True, False
    fork.is_prefill_only = False
    return ForwardBatch.init_new(fork, runner, capture_hidden_mode=CaptureHiddenMode.NULL,
                                 return_hidden_states_before_norm=False)

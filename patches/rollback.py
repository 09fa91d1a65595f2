"""Seam: the scheduler's cache update after a forward. Takes each vetoed (or failed)
pending token back before SGLang processes the step's results: output ids, sequence
length, KV slot and grammar state, so the replacement takes its place."""
from __future__ import annotations

import torch

from .enforce import _Step, state_of

UPDATE_CACHE = "sglang.srt.managers.scheduler.Scheduler.update_cache_from_scheduler"


def after_update_cache(result, scheduler, batch, batch_result, *a, **kw):
    """Roll back each vetoed (or failed) pending token before SGLang processes this step's
    results: the replacement in next_token_ids then takes its place (same position, same
    slot). In an extend batch (mixed chunk) a row's token is the last of its segment."""
    rows, _Step.rollback = _Step.rollback, []
    if not rows:
        return result
    for i in rows:
        req = batch.reqs[i]
        req.output_ids.pop()
        req.kv.kv_committed_len -= 1
        if req.grammar is not None:
            req.grammar.rollback(1)
        fill = req.full_untruncated_fill_ids
        keep = len(req.origin_input_ids) + len(req.output_ids)
        if fill is not req.origin_input_ids and len(fill) > keep:
            del fill[keep:]
    rows_t = torch.tensor(rows, device=batch.seq_lens.device)
    if not batch.spec_algorithm.is_none():
        _shorten(batch, rows, rows_t)  # the slot stays: speculative decoding reserves KV ahead
        return result
    positions = batch.seq_lens[rows_t] - 1
    loc_rows = rows_t
    if not batch.forward_mode.is_decode():
        ends = torch.cumsum(torch.as_tensor(list(batch.extend_lens)), 0) - 1
        loc_rows = ends.to(rows_t.device)[rows_t]
    slots = batch.out_cache_loc[loc_rows.to(batch.out_cache_loc.device)]
    page = scheduler.page_size
    if page > 1:  # a paged free releases the whole page: only free pages this token opened
        slots = slots[(positions % page == 0).to(slots.device)]
    if slots.numel():
        scheduler.token_to_kv_pool_allocator.free(slots)
    for i in rows:
        batch.reqs[i].kv.kv_allocated_len -= 1
    _shorten(batch, rows, rows_t)
    return result


def _shorten(batch, rows: list[int], rows_t: torch.Tensor) -> None:
    """One token less in each row's sequence length (device, host and original)."""
    batch.seq_lens = batch.seq_lens.clone()
    batch.seq_lens[rows_t] -= 1
    if batch.seq_lens_cpu is not None:
        batch.seq_lens_cpu = batch.seq_lens_cpu.clone()
        batch.seq_lens_cpu[torch.tensor(rows)] -= 1
    if batch.orig_seq_lens is not None:
        batch.orig_seq_lens = batch.orig_seq_lens.clone()
        batch.orig_seq_lens[rows_t.to(batch.orig_seq_lens.device)] -= 1
    batch.seq_lens_sum = None
    for i in rows:
        state_of(batch.reqs[i]).vetoed_now = True

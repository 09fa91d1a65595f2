"""Seam: token commit with verification inside SGLang's non-overlap decode loop.

Hooks (all inert unless a request in the batch is enforced):
* AFTER Sampler._preprocess_logits: keep this step's top-k logits (the parent
  distribution of the tokens sampled now), before temperature and sampling touch them.
* `apply` (called by worker_scoring after scoring): veto pending tokens over threshold,
  re-draw them (or force the pivot) by writing next_token_ids in place, which SGLang
  relays as the next step's input.
* AFTER Scheduler.update_cache_from_scheduler: roll the vetoed token back (output_ids,
  sequence length, KV slot) before results are processed.
* AFTER _maybe_collect_customized_info: drop the vetoed token's trace entry.
* AROUND Req.update_finish_state: a finishing token is held until its state is scored.
* AROUND SchedulerOutputStreamer.stream_output: never emit the pending token.
Requires --disable-overlap-schedule (set automatically): with overlap, step k+1 is
launched before step k's veto is known.
"""
from __future__ import annotations

import torch

from tokenwise_safety import metrics
from tokenwise_safety.commit import Intervention, RequestPolicy, RequestState, redraw
from tokenwise_safety.policy import POLICY_KEY
from tokenwise_safety.trace import INTERVENTION_KEY, TRACE_KEY

SAMPLER_PREPROCESS = "sglang.srt.layers.sampler.Sampler._preprocess_logits"
UPDATE_CACHE = "sglang.srt.managers.scheduler.Scheduler.update_cache_from_scheduler"
COLLECT_INFO = ("sglang.srt.managers.scheduler_components.batch_result_processor."
                "SchedulerBatchResultProcessor._maybe_collect_customized_info")
UPDATE_FINISH = "sglang.srt.managers.schedule_batch.Req.update_finish_state"
STREAM_OUTPUT = "sglang.srt.managers.scheduler_components.output_streamer.SchedulerOutputStreamer.stream_output"
ATTR = "_tokenwise_state"


class _Step:
    """What one scheduler step hands from the forward to result processing (one process,
    one step at a time: the non-overlap loop is sequential)."""
    capture_k = 0  # > 0: keep this step's top-k logits
    topk: tuple[torch.Tensor, torch.Tensor] | None = None
    rollback: list[int] = []  # batch rows whose pending token was vetoed


def state_of(req) -> RequestState | None:
    return getattr(req, ATTR, None)


def after_sampler_preprocess(logits, sampler, *args, **kwargs):
    if _Step.capture_k:
        vals, ids = torch.topk(logits, min(_Step.capture_k, logits.shape[-1]), dim=-1)
        _Step.topk = (vals.float(), ids)
        _Step.capture_k = 0
    return logits


def arm(top_k: int) -> None:
    """Start a step: capture the top-k parent logits of this step's sample (0: don't)."""
    _Step.topk, _Step.rollback, _Step.capture_k = None, [], top_k


def request_policy(req, config: dict) -> RequestPolicy:
    """The request's effective policy: its state's once it has one, else its (already
    validated) request field over the launch config."""
    st = state_of(req)
    if st is not None:
        return st.policy
    policy = (req.sampling_params.custom_params or {}).get(POLICY_KEY) or {}
    return RequestPolicy(enforce=policy.get("mode", config["mode"]) == "enforce",
                         threshold=float(policy.get("threshold", config["threshold"])))


def _init_states(batch, config, pivot_ids) -> list[RequestState]:
    states = []
    for req in batch.reqs:
        st = state_of(req)
        if st is None:
            st = RequestState(request_policy(req, config), pivot_ids)
            setattr(req, ATTR, st)
        states.append(st)
    return states


class ParentTable:
    """Each request's parent distribution (top-k logits and ids) and its last window-1
    committed scores, slot-indexed by req_pool_idx and read by gather, so benign steps
    cost one scatter."""

    def __init__(self, slots: int, k: int, window: int, device):
        self.vals = torch.zeros(slots, k, device=device)
        self.ids = torch.zeros(slots, k, dtype=torch.long, device=device)
        self.recent = torch.full((slots, window - 1), float("inf"), device=device)

    def write(self, slots: torch.Tensor, keep: torch.Tensor, vals, ids) -> None:
        rows = slots[keep]
        self.vals[rows] = vals[keep]
        self.ids[rows] = ids[keep]

    def judged(self, slots: torch.Tensor, scores: torch.Tensor, fresh: bool) -> torch.Tensor:
        """Scores under the window rule: each one capped by the request's recent committed
        scores (fresh: a prompt, which has none before it)."""
        if fresh:
            self.recent[slots] = float("inf")
        if not self.recent.shape[1]:
            return scores
        return torch.minimum(scores, self.recent[slots].min(dim=1).values)

    def commit(self, slots: torch.Tensor, keep: torch.Tensor, scores: torch.Tensor) -> None:
        if self.recent.shape[1]:
            shifted = torch.cat([self.recent[slots][:, 1:], scores[:, None]], dim=1)
            self.recent[slots[keep]] = shifted[keep]


def apply(worker, batch, result, scores: torch.Tensor, config: dict, trace_extra: dict) -> None:
    """Veto / re-draw / pivot for one forward step. Mutates result.next_token_ids and the
    request states, records the rows to roll back and the step's intervention entries."""
    if _Step.topk is None or result.next_token_ids is None:
        return
    states = _init_states(batch, config, _pivot_ids(worker, config))
    decode = batch.forward_mode.is_decode()
    # Middle chunks of a chunked prefill sample nothing: they neither veto nor set parents.
    live = [decode or req.inflight_middle_chunks <= 0 for req in batch.reqs]
    vals, ids = _Step.topk
    scores = scores.to(vals.device)
    thresholds = torch.tensor([s.policy.threshold if ok and s.policy.enforce and not s.pending_forced
                               else float("inf") for s, ok in zip(states, live)], device=vals.device)
    table = _table(worker, config)
    slots = batch.req_pool_indices.to(vals.device)
    judged = table.judged(slots, scores, fresh=not decode)
    over = judged >= thresholds  # prefill: the prompt's state; decode: the pending token's
    keep = (~over if decode else torch.ones_like(over)) & torch.tensor(live, device=over.device)
    table.write(slots, keep, vals, ids)
    table.commit(slots, keep, scores)
    over_rows = over.nonzero().flatten().tolist()
    next_ids = result.next_token_ids
    entries: list = [None] * len(states)
    if not decode:
        for i in over_rows:  # a harmful prompt: the answer starts with the pivot
            st = states[i]
            next_ids[i] = st.start_pivot(0, [{"prompt_score": round(float(scores[i]), 6)}])
            entries[i] = st.commit_open()  # index 0 of the trace is output position 0
            metrics.count_pivot()
    else:
        _veto(batch, states, over_rows, scores, table, next_ids, config)
        _Step.rollback = over_rows
        vetoed = set(over_rows)
        for i, st in enumerate(states):
            if i not in vetoed:
                entries[i] = _commit_pending(st, next_ids, i)
    trace_extra[INTERVENTION_KEY] = entries


def _commit_pending(st: RequestState, next_ids, i: int) -> dict | None:
    """The pending token passed: close its intervention record, force the next pivot
    token if one is due, release a held finish. Returns the record for the trace."""
    record = st.commit_open()
    if st.pending_forced:
        forced = st.next_forced()
        if forced is not None:
            next_ids[i] = forced
    if st.deferred_finish is not None:
        st.release_finish = True
    return record


def _veto(batch, states, rows, scores, table, next_ids, config) -> None:
    """Re-draw each vetoed row from its parent's top-k, all its vetoed candidates masked;
    rows with nothing left, or vetoed more than max_vetoes times, get the pivot."""
    if not rows:
        return
    reqs = [batch.reqs[i] for i in rows]
    for i, req in zip(rows, reqs):
        st = states[i]
        if st.open is None:
            st.open = Intervention(len(req.output_ids) - 1, [])
        st.open.vetoed.append({"token": int(req.output_ids[-1]), "score": round(float(scores[i]), 6)})
        metrics.count_veto()
    device = table.vals.device
    slots = batch.req_pool_indices.to(device)[torch.tensor(rows, device=device)]
    cand_vals, cand_ids = table.vals[slots], table.ids[slots]
    bad = [torch.tensor([v["token"] for v in states[i].open.vetoed], device=device) for i in rows]
    vetoed = torch.stack([torch.isin(cand_ids[r], b) for r, b in enumerate(bad)])
    sp = [req.sampling_params for req in reqs]
    # SGLang stores greedy as top_k=1; for a re-draw greedy means "next best", so the
    # request's top-k only narrows sampled rows.
    greedy = [p.top_k == 1 or p.temperature < 1e-5 for p in sp]
    tokens, exhausted = redraw(
        cand_vals, cand_ids, vetoed,
        temperature=torch.tensor([max(p.temperature, 1e-5) for p in sp], device=device),
        top_p=torch.tensor([p.top_p for p in sp], device=device),
        top_k=torch.tensor([0 if g else max(p.top_k, 0) for p, g in zip(sp, greedy)], device=device),
        greedy=torch.tensor(greedy, device=device))
    for r, i in enumerate(rows):
        st = states[i]
        if bool(exhausted[r]) or len(st.open.vetoed) > config["max_vetoes"]:
            next_ids[i] = st.start_pivot(st.open.position, st.open.vetoed)
            metrics.count_pivot()
        else:
            st.open.replacement = int(tokens[r])
            next_ids[i] = tokens[r]


def after_update_cache(result, scheduler, batch, batch_result, *a, **kw):
    """Roll back each vetoed pending token before SGLang processes this step's results:
    the replacement in next_token_ids then takes its place (same position, same slot)."""
    rows, _Step.rollback = _Step.rollback, []
    if not rows:
        return result
    for i in rows:
        req = batch.reqs[i]
        req.output_ids.pop()
        req.kv.kv_committed_len -= 1
        req.kv.kv_allocated_len -= 1
        if req.grammar is not None:
            req.grammar.rollback(1)
        fill = req.full_untruncated_fill_ids
        keep = len(req.origin_input_ids) + len(req.output_ids)
        if fill is not req.origin_input_ids and len(fill) > keep:
            del fill[keep:]
    rows_t = torch.tensor(rows, device=batch.seq_lens.device)
    positions = batch.seq_lens[rows_t] - 1
    slots = batch.out_cache_loc[rows_t.to(batch.out_cache_loc.device)]
    page = scheduler.page_size
    if page > 1:  # a paged free releases the whole page: only free pages this token opened
        slots = slots[(positions % page == 0).to(slots.device)]
    if slots.numel():
        scheduler.token_to_kv_pool_allocator.free(slots)
    batch.seq_lens = batch.seq_lens.clone()
    batch.seq_lens[rows_t] -= 1
    batch.seq_lens_cpu = batch.seq_lens_cpu.clone()
    batch.seq_lens_cpu[torch.tensor(rows)] -= 1
    if batch.orig_seq_lens is not None:
        batch.orig_seq_lens = batch.orig_seq_lens.clone()
        batch.orig_seq_lens[rows_t.to(batch.orig_seq_lens.device)] -= 1
    batch.seq_lens_sum = None
    for i in rows:
        state_of(batch.reqs[i]).vetoed_now = True
    return result


def after_collect_info(result, processor, i, req, logits_output, *a, **kw):
    """A vetoed token's trace entries are not the output's: they live in the intervention."""
    st = state_of(req)
    if st is not None and st.vetoed_now:
        st.vetoed_now = False
        for key in (TRACE_KEY, INTERVENTION_KEY):
            values = (req.customized_info or {}).get(key)
            if values:
                values.pop()
    return result


def around_update_finish(original, req, *args, **kwargs):
    st = state_of(req)
    if st is None or not st.policy.enforce or req.finished():
        return original(req, *args, **kwargs)
    if st.release_finish:  # the finishing token was scored and committed
        reason, length = st.deferred_finish
        st.deferred_finish, st.release_finish = None, False
        req.finished_reason = reason
        req.finished_len = length if length is not None else len(req.output_ids) - 1
        return None
    st.deferred_finish = None
    out = original(req, *args, **kwargs)
    if req.finished() and not _is_abort(req.finished_reason):
        st.deferred_finish = (req.finished_reason, req.finished_len)
        req.finished_reason, req.finished_len = None, None
    return out


def _is_abort(reason) -> bool:
    return type(reason).__name__ == "FINISH_ABORT"


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


def _pivot_ids(worker, config) -> list[int]:
    if not hasattr(worker, "_tokenwise_pivot"):
        worker._tokenwise_pivot = worker.tokenizer.encode(config["pivot"], add_special_tokens=False)
    return worker._tokenwise_pivot


def _table(worker, config) -> ParentTable:
    if not hasattr(worker, "_tokenwise_parents"):
        pool = worker.model_runner.req_to_token_pool
        worker._tokenwise_parents = ParentTable(pool.size + 1, config["top_k"], config["window"],
                                                _Step.topk[0].device)
    return worker._tokenwise_parents

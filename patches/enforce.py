"""Token commit with verification: the per-step core of enforce mode (not a seam itself).

`apply` runs once per forward, called by patches/worker_scoring.py after scoring: it
vetoes pending tokens judged harmful, re-draws them from the parent distribution (or
forces the pivot, or ends the request) by writing next_token_ids in place, which SGLang
relays as the next step's input. The seams that carry the rest, one module each:
parent_capture (the sampler keeps the parent top-k), rollback (the vetoed token leaves
output, sequence length and KV slot), trace_entries (the trace stays aligned with the
output), held_finish (a finishing token waits for its score; plugin-ended requests finish
with content_filter), held_stream (the pending token is never streamed) and retraction
(a retracted request's pending token is forced again at re-prefill). Requires
--disable-overlap-schedule (set automatically): with overlap, step k+1 is launched before
step k's veto is known.

Rows of one forward, by kind: a PROMPT row is a request's first forward (its prompt's last
chunk); a PENDING row computes the state of the request's pending token (every decode row,
and decode rows that SGLang mixes into an extend batch with --enable-mixed-chunk); a
RESAMPLE row is a retracted request being re-prefilled; MIDDLE rows are chunks of a
chunked prefill that sample nothing.
"""
from __future__ import annotations

import logging
import time

import torch

from tokenwise_safety import admission, metrics, self_judge
from tokenwise_safety.commit import Intervention, RequestPolicy, RequestState, redraw
from tokenwise_safety.policy import POLICY_KEY
from tokenwise_safety.trace import INTERVENTION_KEY, JUDGE_KEY

from . import judge_fork

ATTR = "_tokenwise_state"
STOP_RECORD = "tokenwise_stop"  # finish-reason field carrying the closing intervention record
LATE_RECORDS = "tokenwise_late"  # finish-reason field: final interventions no per-token entry could hold
PROMPT, PENDING, RESAMPLE, MIDDLE = "prompt", "pending", "resample", "middle"
STOP_MESSAGES = {
    "grammar": "tokenwise-safety: a harmful continuation was vetoed and the request's grammar "
               "allows neither another candidate nor the safe pivot",
    "second_pivot": "tokenwise-safety: the answer turned harmful again after the safe pivot",
    "error": "tokenwise-safety: the safety check failed for this step (--safety-on-error fail-closed)",
}
logger = logging.getLogger(__name__)


class _Step:
    """What one scheduler step hands from the forward to result processing (one process,
    one step at a time: the non-overlap loop is sequential)."""
    capture_k = 0  # > 0: keep this step's top-k logits
    topk: tuple[torch.Tensor, torch.Tensor] | None = None
    rollback: list[int] = []  # batch rows whose pending token is taken back
    table: "ParentTable | None" = None  # one per scheduler process


def state_of(req) -> RequestState | None:
    return getattr(req, ATTR, None)


def arm(top_k: int) -> None:
    """Start a step: capture the top-k parent logits of this step's sample (0: don't)."""
    _Step.topk, _Step.rollback, _Step.capture_k = None, [], top_k


def states_of(worker, batch, config) -> list[RequestState]:
    """Each request's state, created on first sight from its admitted policy."""
    states = []
    for req in batch.reqs:
        st = state_of(req)
        if st is None:
            st = RequestState(_admitted_policy(req, config))
            setattr(req, ATTR, st)
        states.append(st)
    return states


def _admitted_policy(req, config: dict) -> RequestPolicy:
    custom = req.sampling_params.custom_params
    raw = custom.get(POLICY_KEY) if isinstance(custom, dict) else None
    policy, trusted = admission.admit(raw, config)
    trusted = trusted and (custom is None or isinstance(custom, dict))  # the HTTP side refuses others
    if not trusted:
        metrics.count_untrusted_policy()
        logger.warning("tokenwise safety: request %s carried an unvalidated policy; using the operator's",
                       getattr(req, "rid", "?"))
    origin = "client" if policy != {"mode": config["mode"], "threshold": float(config["threshold"])} \
        else "operator"
    return RequestPolicy(enforce=policy["mode"] == "enforce", threshold=policy["threshold"], origin=origin)


def _kind(req, st: RequestState, decode: bool) -> str:
    if decode:
        return PENDING
    if req.inflight_middle_chunks > 0:
        return MIDDLE
    if st.resample_token is not None:
        return RESAMPLE
    return PENDING if len(req.output_ids) else PROMPT


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

    def judged(self, slots: torch.Tensor, scores: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """Scores under the window rule: each one capped by the request's recent committed
        scores (fresh rows: prompts, which have none before them)."""
        if not self.recent.shape[1]:
            return scores
        self.recent[slots[fresh]] = float("inf")
        return torch.minimum(scores, self.recent[slots].min(dim=1).values)

    def commit(self, slots: torch.Tensor, keep: torch.Tensor, scores: torch.Tensor) -> None:
        if self.recent.shape[1]:
            shifted = torch.cat([self.recent[slots][:, 1:], scores[:, None]], dim=1)
            self.recent[slots[keep]] = shifted[keep]


def apply(worker, batch, result, scores: torch.Tensor, ok: torch.Tensor, config: dict,
          trace_extra: dict) -> None:
    """Veto / re-draw / pivot / end for one forward step. Mutates result.next_token_ids
    and the request states, records the rows to roll back and the step's intervention
    entries. ok [N] bool: rows whose score is usable (the others failed, --safety-on-error)."""
    next_ids = result.next_token_ids
    if next_ids is None:
        return
    states = states_of(worker, batch, config)
    decode = batch.forward_mode.is_decode()
    kinds = [_kind(req, st, decode) for req, st in zip(batch.reqs, states)]
    failed = (~ok).nonzero().flatten().tolist() if not bool(ok.all()) else []
    stops = _fail(batch.reqs, states, kinds, failed, config)
    entries: list = [None] * len(states)
    rollback = [i for i in stops if kinds[i] == PENDING and states[i].policy.enforce]
    if _Step.topk is not None:
        rollback += _judge(worker, batch, states, kinds, scores, ok, stops, next_ids, entries, config)
    _Step.rollback = rollback
    trace_extra[INTERVENTION_KEY] = entries
    if config["judge"]["mode"] != "off":
        trace_extra[JUDGE_KEY] = _judge_records(states, kinds, rollback, stops)


def _fail(reqs, states, kinds, failed: list[int], config) -> set[int]:
    """Rows whose scoring failed: fail-closed ends them (returned), fail-open lets them run."""
    if not failed:
        return set()
    closed = config["on_error"] == "fail-closed"
    metrics.count_errors("fail_closed" if closed else "fail_open", len(failed))
    if not closed:
        return set()
    stops = set()
    for i in failed:
        if kinds[i] != MIDDLE and states[i].stop is None:
            _end(states[i], len(reqs[i].output_ids) - (kinds[i] == PENDING and states[i].policy.enforce),
                 [], "error")
            stops.add(i)
    return stops


def _judge(worker, batch, states, kinds, scores, ok, stops, next_ids, entries, config) -> list[int]:
    """The enforce step proper; returns the rows whose pending token is vetoed."""
    vals, ids = _Step.topk
    dev = vals.device
    scores = scores.to(dev)
    n = len(states)
    mask = lambda pred: torch.tensor([pred(i) for i in range(n)], dtype=torch.bool, device=dev)  # noqa: E731
    live = mask(lambda i: kinds[i] != MIDDLE and i not in stops)
    scored = mask(lambda i: kinds[i] in (PROMPT, PENDING)) & ok.to(dev) & live
    judge = scored & mask(lambda i: states[i].policy.enforce and not states[i].pending_forced)
    thresholds = torch.tensor([st.policy.threshold for st in states], device=dev)
    table = _table(worker, config, dev)
    slots = batch.req_pool_indices.to(dev)
    _restore_history(table, batch, kinds, states)
    judged = table.judged(slots, scores, mask(lambda i: kinds[i] == PROMPT))
    over = (judged >= thresholds) & judge
    if config["judge"]["mode"] != "off":
        over = _second_opinion(worker, batch, states, kinds, judged, judge, over, config)
    over_rows = over.nonzero().flatten().tolist()  # the step's one host sync
    vetoed = [i for i in over_rows if kinds[i] == PENDING]
    keep = live & ~mask(lambda i: i in vetoed)
    table.write(slots, keep, vals, ids)
    table.commit(slots, keep & scored, scores)
    for i in over_rows:
        if kinds[i] == PROMPT:  # a harmful prompt: the answer starts with the pivot
            record = [{"prompt_score": round(float(scores[i]), 6)}]
            _pivot_or_end(worker, config, batch.reqs[i], states[i], 0, record, next_ids, i)
            entries[i] = states[i].commit_open()  # index 0 of the trace is output position 0
    _veto(worker, batch, states, vetoed, scores, table, next_ids, config)
    for i, (st, kind) in enumerate(zip(states, kinds)):
        if kind == RESAMPLE:
            next_ids[i] = st.resample_token
            st.resample_token, st.vetoed_now = None, True  # this step re-scored a committed state
        elif kind == PENDING and i not in vetoed and i not in stops:
            entries[i] = _commit_pending(st, next_ids, i)
    return vetoed


def _second_opinion(worker, batch, states, kinds, judged, judge, over, config) -> torch.Tensor:
    """Self-judgment for rows whose score lies in the uncertain band: a standing verdict
    (younger than --safety-judge-every positions) or a fresh judge pass on a fork of the
    request's KV decides for them; returns `over` with the verdicts applied (mode "on")."""
    jc = config["judge"]
    band = judge & (judged >= jc["low"]) & (judged <= jc["high"])
    rows = band.nonzero().flatten().tolist()
    if not rows:
        return over
    position = {i: len(batch.reqs[i].output_ids) - 1 if kinds[i] == PENDING else -1 for i in rows}
    verdicts = {i: states[i].judge.standing(position[i], jc["every"]) for i in rows}
    due = [i for i in rows if verdicts[i] is None]
    if due:
        early = [i for i in rows if verdicts[i] is not None and states[i].judge.half_spent(position[i], jc["every"])]
        verdicts.update(_judge_pass(worker, batch, states, due + early, position, judged, over, config))
    if jc["mode"] == "on":
        over = over.clone()
        for i, harmful in verdicts.items():
            if harmful is not None:
                over[i] = harmful
    return over


def _judge_pass(worker, batch, states, due, position, judged, over, config) -> dict[int, bool | None]:
    """One batched fork forward for the due rows; their verdicts (None: the pass could not
    run this step, the probe decides alone) and the trace records."""
    jc = config["judge"]
    suffix, yes, no = _judge_tokens(worker, config)
    started = time.perf_counter()
    try:
        logits, computed = judge_fork.run(worker, batch, due, suffix)
    except judge_fork.JudgeUnavailable as e:
        metrics.count_judge("unavailable", len(due))
        logger.warning("tokenwise safety: self-judgment skipped for %d request(s): %s", len(due), e)
        return {i: None for i in due}
    except Exception:  # a second opinion that fails leaves the first one standing
        metrics.count_judge("error", len(due))
        logger.exception("tokenwise safety: self-judgment failed for %d request(s); the probe decides", len(due))
        return {i: None for i in due}
    p = self_judge.p_yes(logits, yes.to(logits.device), no.to(logits.device)).tolist()
    metrics.observe_judge_seconds(time.perf_counter() - started)
    verdicts = {}
    for r, i in enumerate(due):
        harmful = p[r] >= jc["verdict_threshold"]
        st = states[i].judge
        st.position, st.harmful = position[i], harmful
        effect = self_judge.effect(bool(over[i]), harmful)
        st.unsent.append({"position": position[i], "p_yes": round(p[r], 6), "score": round(float(judged[i]), 6),
                          "tokens": computed[r], "effect": effect})
        metrics.count_judge(effect if jc["mode"] == "on" else "shadow")
        metrics.count_judge_tokens(computed[r])
        verdicts[i] = harmful
    return verdicts


def _judge_tokens(worker, config) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The judge suffix's tokens and the verdict token ids, built once per worker."""
    if not hasattr(worker, "_tokenwise_judge"):
        tok = worker.tokenizer
        suffix = self_judge.suffix_ids(tok, config["judge"]["question"])
        yes, no = self_judge.verdict_ids(tok)
        worker._tokenwise_judge = (suffix, torch.tensor(yes), torch.tensor(no))
    return worker._tokenwise_judge


def _judge_records(states, kinds, vetoed: list[int], stops: set[int]) -> list:
    """Per row, the judge records to file at this step's trace entry: a row whose pending
    token was taken back keeps them for the position's next entry."""
    out = []
    for i, st in enumerate(states):
        keep = kinds[i] == MIDDLE or i in vetoed or i in stops or not st.judge.unsent
        out.append(None if keep else st.judge.unsent)
        if not keep:
            st.judge.unsent = []
    return out


def _restore_history(table: ParentTable, batch, kinds, states) -> None:
    """A re-prefilled request has a new slot: put its window history back."""
    for i, kind in enumerate(kinds):
        st = states[i]
        if kind == RESAMPLE and st.saved_history is not None and table.recent.shape[1]:
            table.recent[batch.req_pool_indices[i]] = st.saved_history.to(table.recent.device)
            st.saved_history = None


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


def _veto(worker, batch, states, rows, scores, table, next_ids, config) -> None:
    """Re-draw each vetoed row from its parent's top-k, all its vetoed candidates masked;
    rows with nothing left, or vetoed more than max_vetoes times, get the pivot (or end)."""
    if not rows:
        return
    reqs = [batch.reqs[i] for i in rows]
    for i, req in zip(rows, reqs):
        st = states[i]
        if st.open is None:
            st.open = Intervention(len(req.output_ids) - 1, [])
        st.open.vetoed.append({"token": int(req.output_ids[-1]), "score": round(float(scores[i]), 6)})
        metrics.count_veto(st.policy.origin)
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
    for r, (i, req) in enumerate(zip(rows, reqs)):
        st = states[i]
        if bool(exhausted[r]) or len(st.open.vetoed) > config["max_vetoes"]:
            _pivot_or_end(worker, config, req, st, st.open.position, st.open.vetoed, next_ids, i)
        else:
            st.open.replacement = int(tokens[r])
            next_ids[i] = tokens[r]


def _pivot_or_end(worker, config, req, st: RequestState, position: int, vetoed: list, next_ids, i: int,
                  prev: int | None = None) -> None:
    """Steer in the pivot at `position`, or end the request there: a grammar-constrained
    answer cannot take free text, and a second pivot in one answer would loop. prev: the
    token before `position` when it is not in the output yet (a kept speculative draft)."""
    reason = "grammar" if req.grammar is not None else "second_pivot" if st.pivots else None
    if reason is not None:
        _end(st, position, vetoed, reason)
        return
    plain, spaced = _pivot_ids(worker, config)
    if prev is None and position > 0:
        prev = req.output_ids[position - 1]
    ids = spaced if prev is not None and not _ends_in_space(worker, prev) else plain
    next_ids[i] = st.start_pivot(position, vetoed, ids)
    metrics.count_pivot(st.policy.origin)


def _end(st: RequestState, position: int, vetoed: list, reason: str) -> None:
    """The plugin ends the request at `position` (held_finish.py finishes it this step)."""
    st.end_here(position, vetoed, reason)
    metrics.count_finish(reason)


def _ends_in_space(worker, token_id: int) -> bool:
    text = worker.tokenizer.decode([int(token_id)])
    return not text or text[-1].isspace()


def _pivot_ids(worker, config) -> tuple[list[int], list[int]]:
    """The pivot's tokens, plain (answer start, or after whitespace) and with a leading
    space (after a word: the pivot must not splice into it)."""
    if not hasattr(worker, "_tokenwise_pivot"):
        enc = lambda text: worker.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
        worker._tokenwise_pivot = (enc(config["pivot"]), enc(" " + config["pivot"].lstrip()))
    return worker._tokenwise_pivot


def _table(worker, config, device) -> ParentTable:
    if _Step.table is None:
        pool = worker.model_runner.req_to_token_pool
        _Step.table = ParentTable(pool.size + 1, config["top_k"], config["window"], device)
    return _Step.table

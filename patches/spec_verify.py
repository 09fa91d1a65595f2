"""Seam: speculative verification (eagle_sample, shared by NGRAM, STANDALONE and EAGLE).

The target's verify forward computes the state of every node of every request's draft
tree (node 0, the root, is the request's pending token; patches/layer_capture.py taps
the middle layers, and the forward keeps the final layer in capture mode FULL). Here the
probe scores all B*D nodes in one batched op, and, for enforced requests, before the
stock tree verification accepts anything:
- a draft node judged harmful (window rule along its path) has its token's logit set
  to -inf in its parent's row, where SGLang applies grammar masks, so verification
  neither accepts it nor draws it as the bonus token;
- a harmful root is vetoed as in non-speculative enforce: no draft is accepted, the
  root is taken back (patches/rollback.py) and re-drawn from its parent distribution;
- a pivot being forced is accepted from its drafts (patches/pivot_drafts.py places them):
  each node that spells its next token is left the only finite logit of its parent row;
- a request whose next token is not the model's to choose otherwise (a finish held for
  its score, a scoring failure under fail-closed, a pivot no draft spells) accepts no draft.
After verification the run each request keeps is committed exactly as a sequential
decoder would have: vetoed nodes its parent row ranks above the kept token become that
position's intervention record, more than --safety-max-vetoes of them (or nothing left
in the top-k) cuts the run there and steers in the pivot, and the bonus token's parent
distribution is kept for its own veto next step (it is committed once scored).
"""
from __future__ import annotations

import logging

import torch

from tokenwise_safety import metrics
from tokenwise_safety.commit import Intervention
from tokenwise_safety.spec_tree import (force_in_parent_rows, forced_chain, judged_along_paths, mask_in_parent_rows,
                                        parents_of, shift_in, unmask_drawn)
from tokenwise_safety.trace import INTERVENTION_KEY, TRACE_KEY

from . import enforce, pivot_drafts, worker_scoring

VERIFY = "sglang.srt.speculative.eagle_utils.eagle_sample"
logger = logging.getLogger(__name__)


class _Verify:
    worker = None  # the target worker of the verify forward now running (one per process)


def before_verify_forward(worker, batch=None, *args, **kwargs):
    """BEFORE the target worker's verify forward: keep every node's final hidden state.
    NGRAM hands over the schedule batch, the EAGLE-v2 workers (STANDALONE) a ready
    forward batch (forward_batch=...)."""
    target = batch if batch is not None else kwargs.get("forward_batch")
    if kwargs.get("is_verify") and target is not None and worker_scoring._config(worker) is not None:
        from sglang.srt.model_executor.forward_batch_info import CaptureHiddenMode

        if target.spec_info is not None:
            target.spec_info.capture_hidden_mode = CaptureHiddenMode.FULL
        if hasattr(target, "capture_hidden_mode"):
            target.capture_hidden_mode = CaptureHiddenMode.FULL
        _Verify.worker = worker
    return None


class TreeScores:
    """Per request, the scores of the tokens its step commits (the root, then each kept
    draft), as customized_info: patches/trace_entries.py splices each list in."""

    def __init__(self, rows: list[list[float | None]]):
        self.rows = rows

    def __getitem__(self, i):
        return SpliceList(self.rows[i])

    def __len__(self):
        return len(self.rows)


class SpliceList(list):
    """One request's per-token values of a speculative step (spliced, not appended)."""

    def copy(self):
        return SpliceList(self)


def around_eagle_sample(original, verify_input, batch, logits_output, *args, **kwargs):
    worker, _Verify.worker = _Verify.worker, None
    config = getattr(worker, "_tokenwise", None) if worker is not None else None
    if config is None or batch.forward_mode.is_idle():
        return original(verify_input, batch, logits_output, *args, **kwargs)
    n, d = len(batch.reqs), verify_input.draft_token_num
    scores, ok = _score_tree(worker, logits_output, verify_input, n * d, config)
    tree = _Tree(worker, batch, verify_input, logits_output, scores.view(n, d), ok.view(n, d), config)
    try:
        tree.veto_before_verify()
    except Exception:  # the veto path must cost its requests, never the server
        logger.exception("tokenwise safety: speculative veto failed for this step")
        tree.fail_all()
    predict, accept_lens, accept_index = original(verify_input, batch, logits_output, *args, **kwargs)
    tree.commit(predict, accept_lens, accept_index)
    return predict, accept_lens, accept_index


def _score_tree(worker, logits_output, verify_input, rows: int, config):
    """(scores [rows], ok [rows]) for every node of every tree, one batched op."""
    return worker_scoring.guarded_scores(
        config, rows, f"a verify step of {rows} nodes",
        lambda: (worker_scoring.all_rows(worker, logits_output, config["layers"], rows),
                 verify_input.draft_token.reshape(-1)))


class _Tree:
    """One verify step's trees: the vetoes before verification, the commit after."""

    def __init__(self, worker, batch, verify_input, logits_output, scores, ok, config):
        self.worker, self.batch, self.config = worker, batch, config
        self.logits = logits_output.next_token_logits
        self.logits_output = logits_output
        dev = self.logits.device
        self.scores, self.ok = scores.to(dev), ok.to(dev)
        self.n, self.d = scores.shape
        self.tokens = verify_input.draft_token.reshape(self.n, self.d).long().to(dev)
        self.parent, self.depth = parents_of(verify_input.retrieve_next_token.to(dev),
                                             verify_input.retrieve_next_sibling.to(dev))
        self.states = enforce.states_of(worker, batch, config)
        self.table = enforce._table(worker, config, dev)
        self.slots = batch.req_pool_indices.to(dev)
        self.base = torch.arange(self.n, device=dev)[:, None] * self.d
        self.stops: set[int] = set()
        self.rollback: list[int] = []

    def _mask(self, pred) -> torch.Tensor:
        return torch.tensor([bool(pred(i, st)) for i, st in enumerate(self.states)],
                            dtype=torch.bool, device=self.logits.device)

    def veto_before_verify(self) -> None:
        st_enforce = self._mask(lambda i, st: st.policy.enforce)
        failed = (~self.ok.all(dim=1)).nonzero().flatten().tolist()
        kinds = [enforce.PENDING] * self.n
        self.stops = enforce._fail(self.batch.reqs, self.states, kinds, failed, self.config)
        self.rollback = [i for i in self.stops if self.states[i].policy.enforce]
        ok_rows = self.ok.all(dim=1) & ~self._mask(lambda i, st: i in self.stops)
        thresholds = torch.tensor([st.policy.threshold for st in self.states], device=self.logits.device)
        judged = judged_along_paths(self.scores, self.parent, self.depth, self.table.recent[self.slots])
        over = (judged >= thresholds[:, None]) & (st_enforce & ok_rows)[:, None]
        root_judged = ~self._mask(lambda i, st: st.pending_forced)
        self.root_over = over[:, 0] & root_judged
        # A pivot being forced: the drafted nodes that spell its next tokens are accepted
        # without judging (patches/pivot_drafts.py places them), no other child of theirs.
        queue, queued = self._queues()
        self.forced = forced_chain(self.tokens, self.parent, self.depth, queue)
        chained = self.forced.any(dim=1)
        # Tokens that are not the model's to choose: accept no draft this step.
        self.fixed = self.root_over | (self._mask(lambda i, st: i in self.stops or (
            st.pending_forced and st.pivot_queue) or st.deferred_finish is not None) & ~chained)
        forced_row = torch.zeros_like(self.forced)
        b, j = self.forced.nonzero(as_tuple=True)
        forced_row[b, self.parent[b, j]] = True
        under_forced = forced_row.gather(1, self.parent.clamp(min=0)) & (self.parent >= 0)
        # The pivot goes on past the chain: the chain's last node takes no draft either.
        end = torch.where(self.forced, self.depth, -1).argmax(dim=1)
        goes_on = chained & (queued > self.forced.sum(dim=1))
        self.past_chain = (self.parent == end[:, None]) & goes_on[:, None]
        over &= ~self.forced
        self.vetoed = over & (self.parent >= 0) & ~self.fixed[:, None] & ~under_forced & ~self.past_chain
        if bool(self.vetoed.any()):
            for i, count in enumerate(self.vetoed.sum(dim=1).tolist()):
                metrics.count_draft_vetoes(count, self.states[i].policy.origin)
        # Each node's logit in its parent's row, before any mask (ranks the vetoes).
        parent_rows = (self.base + self.parent.clamp(min=0)).flatten()
        self.child_logit = self.logits[parent_rows, self.tokens.flatten()].view(self.n, self.d).float()
        blocked = self.vetoed | (self.fixed[:, None] & (self.parent == 0)) | self.past_chain
        self.masked = mask_in_parent_rows(self.logits, self.parent, self.tokens, blocked)
        self.forced_rows = force_in_parent_rows(self.logits, self.parent, self.tokens, self.forced)

    def _queues(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([n, D-1] the pivot tokens still to force after each request's root, -1 padded;
        [n] how many there are in all), for the requests forcing a pivot (pivot_drafts.forcing).
        No request forcing (the usual step): width 0, so the chain search does nothing."""
        rows = [i for i, st in enumerate(self.states)
                if pivot_drafts.ENABLED and i not in self.stops and pivot_drafts.forcing(st)]
        q = torch.full((self.n, self.d - 1 if rows else 0), -1, dtype=torch.long)
        queued = torch.zeros(self.n, dtype=torch.long)
        for i in rows:
            head = self.states[i].pivot_queue[: self.d - 1]
            q[i, :len(head)] = torch.tensor(head, dtype=torch.long)
            queued[i] = len(self.states[i].pivot_queue)
        return q.to(self.logits.device), queued.to(self.logits.device)

    def _unforce(self) -> None:
        rows, saved = getattr(self, "forced_rows", (None, None))
        if rows is not None and rows.numel():
            self.logits[rows] = saved
        self.forced_rows = (None, None)

    def fail_all(self) -> None:
        """A bug in the veto path: every enforced row goes to --safety-on-error, and the
        logits get back any mask already applied."""
        self._unforce()
        rows, toks, values = getattr(self, "masked", (None, None, None))
        if rows is not None:
            self.logits[rows, toks] = values
        empty = torch.zeros(0, dtype=torch.long, device=self.logits.device)
        self.masked = (empty, empty, self.logits[empty, empty])
        self.forced = torch.zeros_like(self.ok)
        self.ok = torch.zeros_like(self.ok)
        self.root_over = torch.zeros(self.n, dtype=torch.bool, device=self.logits.device)
        self.vetoed = torch.zeros_like(self.ok)
        self.fixed = self._mask(lambda i, st: st.policy.enforce)
        self.child_logit = torch.zeros_like(self.scores)
        kinds = [enforce.PENDING] * self.n
        self.stops = enforce._fail(self.batch.reqs, self.states, kinds, list(range(self.n)), self.config)
        self.rollback = [i for i in self.stops if self.states[i].policy.enforce]

    def commit(self, predict, accept_lens, accept_index) -> None:
        """Commit each request's kept run: trace, interventions, window history, the
        bonus token's parent distribution; cut runs where a sequential decoder would have
        pivoted; override the bonus where the plugin chooses it."""
        self._unforce()
        lens = accept_lens.tolist()  # the step's host sync (SGLang syncs on it anyway)
        paths = accept_index.tolist()
        dev = self.logits.device
        self._no_masked_bonus(predict, paths, lens)
        next_ids = torch.zeros(self.n, dtype=torch.long, device=dev)
        entries: list[list] = [[None] * lens[i] for i in range(self.n)]
        # A harmful root: the non-speculative veto, from the root's stored parent row.
        root_rows = [i for i in self.root_over.nonzero().flatten().tolist() if i not in self.stops]
        enforce._veto(self.worker, self.batch, self.states, root_rows, self.scores[:, 0], self.table,
                      next_ids, self.config)
        for i in root_rows:
            predict[paths[i][0]] = next_ids[i]
        self.rollback += root_rows
        drawn = self._drawn(predict, paths, lens)
        for i, st in enumerate(self.states):
            if i in self.rollback or i in self.stops or not st.policy.enforce:
                continue
            forcing = st.pending_forced and bool(st.pivot_queue)
            entries[i][0] = enforce._commit_pending(st, next_ids, i)
            cut = self._force(i, st, next_ids, predict, paths, lens) if forcing else None
            if cut is None:
                cut = self._intervene(i, st, drawn.get(i, []), predict, paths, lens, entries)
            if cut is not None:
                accept_index[i, cut + 1:] = -1
                accept_lens[i] = lens[i] = cut + 1
                entries[i] = entries[i][:cut + 1]
        # The bonus token's parent distribution is kept unmasked: a vetoed draft the row
        # ranked below the bonus was never drawn, and a re-draw must meet it (and score
        # it) exactly where a sequential decoder would.
        rows, toks, values = self.masked
        self.logits[rows, toks] = values
        local = (accept_index.long().to(dev) - self.base).clamp(min=0)  # after any cut
        self._keep_history(local, lens)
        self._publish(local, lens, entries)
        enforce._Step.rollback = sorted(set(self.rollback))

    def _no_masked_bonus(self, predict, paths, lens) -> None:
        """Sampled verify on CUDA can draw a vetoed token as the bonus (its fallback when
        nothing is left to sample): an enforced request gets its row's best finite token."""
        enforced = [i for i, st in enumerate(self.states) if st.policy.enforce and i not in self.stops]
        if not enforced:
            return
        dev = self.logits.device
        rows = torch.tensor([paths[i][lens[i] - 1] for i in enforced], device=dev)
        drawn = predict[rows]
        if unmask_drawn(self.logits, rows, drawn):
            logger.warning("tokenwise safety: verify drew a masked token as the bonus; the row's best kept instead")
            predict[rows] = drawn

    def _force(self, i, st, next_ids, predict, paths, lens) -> int | None:
        """A pivot being forced: its tokens are the run's first tokens (accepted drafts
        that spell it, then the bonus if the pivot goes on past them). Returns a depth to
        cut the run at if an accepted draft is not the pivot's token (never expected)."""
        predict[paths[i][0]] = next_ids[i]
        for k in range(1, lens[i]):
            forced = st.next_forced()
            if forced is None:  # the pivot is done: the rest of the run is the model's
                return None
            mismatch = k < lens[i] - 1 and int(predict[paths[i][k]]) != forced
            predict[paths[i][k]] = forced
            if mismatch:
                logger.error("tokenwise safety: an accepted draft is not the pivot's token; the run is cut there")
                return k
        return None

    def _drawn(self, predict, paths, lens) -> dict[int, list[tuple[int, list[int]]]]:
        """Per request, the rows along its kept run whose vetoed children a sequential
        greedy decoder would have drawn before the token kept there (those the row ranks
        above it): {i: [(k, [child, ...] best first), ...]}, k = the row's depth."""
        if not bool(self.vetoed.any()):
            return {}
        out: dict[int, list] = {}
        for i in self.vetoed.any(dim=1).nonzero().flatten().tolist():
            for k in range(lens[i]):
                row = paths[i][k] - i * self.d
                kids = (self.vetoed[i] & (self.parent[i] == row)).nonzero().flatten()
                if not kids.numel():
                    continue
                kept = self.logits[paths[i][k], int(predict[paths[i][k]])].float()
                ahead = self.child_logit[i, kids] > kept
                kids = sorted(kids[ahead].tolist(), key=lambda c: -float(self.child_logit[i, c]))
                if kids:
                    out.setdefault(i, []).append((k, kids))
        return out

    def _intervene(self, i, st, rows, predict, paths, lens, entries) -> int | None:
        """Record the interventions along request i's kept run; returns the depth to cut
        the run at when one of them ends in the pivot (or the request's end)."""
        req = self.batch.reqs[i]
        position0 = len(req.output_ids)  # output index of the token kept after the root
        for k, kids in rows:
            vetoed = [{"token": int(self.tokens[i, c]), "score": round(float(self.scores[i, c]), 6)} for c in kids]
            for _ in kids:
                metrics.count_veto(st.policy.origin)
            position = position0 + k
            if len(vetoed) > self.config["max_vetoes"] or len(vetoed) >= self.config["top_k"]:
                prev = req.output_ids[-1] if k == 0 else int(predict[paths[i][k - 1]])
                enforce._pivot_or_end(self.worker, self.config, req, st, position, vetoed,
                                      _Slot(predict, paths[i][k]), i, prev=prev)
                if st.stop is not None:
                    self.stops.add(i)
                return k
            record = Intervention(position, vetoed, int(predict[paths[i][k]]))
            if k == lens[i] - 1:
                st.open = record  # the bonus token: committed once scored, next step
            else:
                st.interventions.append(record)
                entries[i][k + 1] = record.as_dict()
        return None

    def _keep_history(self, local, lens) -> None:
        """Window history and the bonus's parent distribution, batched."""
        dev = self.logits.device
        lens_t = torch.tensor(lens, device=dev)
        keep = ~self._mask(lambda i, st: i in self.rollback or i in self.stops)
        path_scores = self.scores.gather(1, local)
        if self.table.recent.shape[1]:
            shifted = shift_in(self.table.recent[self.slots], path_scores, lens_t)
            self.table.recent[self.slots[keep]] = shifted[keep]
        bonus_rows = (self.base[:, 0] + local.gather(1, (lens_t - 1)[:, None])[:, 0])
        vals, ids = torch.topk(self.logits[bonus_rows], min(self.table.vals.shape[1], self.logits.shape[-1]), dim=-1)
        self.table.write(self.slots, keep, vals.float(), ids)
        metrics.observe_accept_lengths([lens[i] for i in range(self.n) if bool(keep[i])])

    def _publish(self, local, lens, entries) -> None:
        path_scores = torch.where(self.ok, self.scores, torch.full_like(self.scores, float("nan"))).gather(1, local)
        rows = [[None if v != v else v for v in path_scores[i, :lens[i]].tolist()] for i in range(self.n)]
        metrics.observe_scores([v for r in rows for v in r if v is not None])
        info = self.logits_output.customized_info or {}
        info[TRACE_KEY] = TreeScores(rows)
        info[INTERVENTION_KEY] = TreeScores(entries)
        self.logits_output.customized_info = info


class _Slot:
    """next_ids-like view of one predict entry (enforce._pivot_or_end writes next_ids[i])."""

    def __init__(self, predict, index: int):
        self.predict, self.index = predict, index

    def __setitem__(self, _i, value):
        self.predict[self.index] = value

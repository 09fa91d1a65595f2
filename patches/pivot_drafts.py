"""Seam: the drafts of a request whose pivot is being forced (NGRAM's draft preparation,
and the EAGLE-family draft worker's chain for STANDALONE with --speculative-eagle-topk 1).

The pivot's tokens are fixed, so a drafter's guesses are wasted on them and the pivot took
one verify step a token. Here the pivot's next tokens replace the request's drafts, as a
chain from its root; at verify (patches/spec_verify.py) they are the only tokens their
parent rows allow, so one step commits up to D of them. The drafts are only a proposal:
verify accepts a node only when its token is the pivot's next one, so a drafter this seam
does not reach (trees with topk >= 2, other algorithms) is still exact, one token a step.
TOKENWISE_PIVOT_DRAFTS=0 turns both halves off (a pivot then takes one verify step a token).

Hooks (HOOKS, installed by patches/layer_capture.py when a speculative model loads): AFTER
NGRAMWorker._prepare_draft_tokens rewrites the numpy drafts and tree mask before SGLang
builds the tree from them; AFTER EagleDraftWorker.draft rewrites the chain's draft tokens.
"""
from __future__ import annotations

import os

import numpy as np

from .enforce import state_of

ENV = "TOKENWISE_PIVOT_DRAFTS"
# 0: neither placed as drafts nor accepted as drafts at verify: one verify step a pivot token
ENABLED = os.environ.get(ENV, "1") != "0"
NGRAM_PREPARE = "sglang.srt.speculative.ngram_worker.NGRAMWorker._prepare_draft_tokens"
EAGLE_DRAFT = "sglang.srt.speculative.eagle_worker_v2.EagleDraftWorker.draft"


def forcing(st) -> bool:
    """An enforced request whose next tokens are the pivot's, with nothing held or stopped:
    the one whose pivot is drafted here and forced from its drafts at verify."""
    return st is not None and st.policy.enforce and st.pending_forced and bool(st.pivot_queue) \
        and st.deferred_finish is None and st.stop is None


def pivot_heads(reqs, width: int) -> dict[int, list[int]]:
    """{batch row: the next pivot tokens after its root, at most `width`} for the requests
    forcing a pivot now."""
    return {i: list(st.pivot_queue[:width]) for i, st in enumerate(map(state_of, reqs)) if forcing(st)}


def chain_drafts(drafts: np.ndarray, mask: np.ndarray, d: int, heads: dict[int, list[int]]) -> None:
    """In place: each listed request's D drafts become [root, pivot..., filler] as a
    chain (mask row j covers nodes 0..j). Filler past a short pivot repeats its last
    token: a guess like any other, accepted only if the model picks it."""
    rows = drafts.reshape(-1, d)
    tree = mask.reshape(-1, d, d)
    chain = np.tril(np.ones((d, d), dtype=tree.dtype))
    for i, head in heads.items():
        fill = head + [head[-1]] * (d - 1 - len(head))
        rows[i, 1:] = fill
        tree[i] = chain


def after_ngram_prepare(result, worker, batch, *args, **kwargs):
    heads = pivot_heads(batch.reqs, worker.draft_token_num - 1)
    if heads:
        drafts, mask = result
        chain_drafts(drafts, mask, worker.draft_token_num, heads)
    return result


def after_eagle_draft(result, worker, batch, *args, **kwargs):
    verify_input = result[0] if isinstance(result, tuple) else result
    d = getattr(verify_input, "draft_token_num", 0)
    if getattr(worker, "topk", 1) != 1 or d < 2 or verify_input.draft_token is None:
        return result  # a tree: its drafts stay; verify forces the pivot a token a step
    heads = pivot_heads(batch.reqs, d - 1)
    if heads:
        tokens = verify_input.draft_token.view(-1, d)
        for i, head in heads.items():
            tokens[i, 1:1 + len(head)] = tokens.new_tensor(head)
    return result


HOOKS = ((NGRAM_PREPARE, after_ngram_prepare, "AFTER"), (EAGLE_DRAFT, after_eagle_draft, "AFTER"))

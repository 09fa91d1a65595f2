"""Seam: retraction (ScheduleBatch.release_req). A retracted request loses its slot and
is re-prefilled later from its output: its pending (unscored) token is taken back and its
window history kept, so the re-prefill forces the same token again (patches/enforce.py,
RESAMPLE rows) and the next step scores it as usual."""
from __future__ import annotations

from .enforce import _Step, state_of

RELEASE_REQ = "sglang.srt.managers.schedule_batch.ScheduleBatch.release_req"


def before_release_req(batch, idx, *args, **kwargs):
    """A retracted request loses its slot and is re-prefilled later from its output: take
    its pending (unscored) token back and keep its window history, so the re-prefill
    forces the same token again and the next step scores it as usual."""
    req = batch.reqs[idx]
    st = state_of(req)
    if st is None or not st.policy.enforce or req.finished() or not req.output_ids \
            or st.resample_token is not None:
        return None
    table = _Step.table
    if table is not None and table.recent.shape[1] and req.req_pool_idx is not None:
        st.saved_history = table.recent[req.req_pool_idx].clone()
    st.resample_token = int(req.output_ids.pop())
    if req.grammar is not None:
        req.grammar.rollback(1)
    return None

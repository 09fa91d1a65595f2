"""Seam: the finish check. A finishing token (length, EOS, stop) is held until its own
state is scored; a request the plugin ends finishes with a content_filter reason.

Only the request's last output token is ever unscored (the pending token: a decode step's
new token, a speculative step's bonus). A finish that leaves it out of the answer
(finished_len short of the output, as when a speculative run crosses max_new_tokens or
accepts an EOS draft) ends on tokens already scored and judged, so it is not held: holding
it would cost the request a forward that scores a token nobody receives."""
from __future__ import annotations

from tokenwise_safety.commit import Intervention

from .enforce import STOP_MESSAGES, STOP_RECORD, state_of

UPDATE_FINISH = "sglang.srt.managers.schedule_batch.Req.update_finish_state"


def around_update_finish(original, req, *args, **kwargs):
    st = state_of(req)
    if st is None or req.finished():
        return original(req, *args, **kwargs)
    if st.stop is not None:  # the plugin ends it: the token appended this step is not committed
        req.finished_reason = safety_finish(st.stop)
        req.finished_len = max(len(req.output_ids) - 1, 0)
        return None
    if not st.policy.enforce:
        return original(req, *args, **kwargs)
    if st.release_finish:  # the finishing token was scored and committed
        reason, length = st.deferred_finish
        st.deferred_finish, st.release_finish = None, False
        req.finished_reason = reason
        req.finished_len = length if length is not None else len(req.output_ids) - 1
        return None
    st.deferred_finish = None
    out = original(req, *args, **kwargs)
    if req.finished() and not _is_abort(req.finished_reason) and not _ends_before_pending(req):
        st.deferred_finish = (req.finished_reason, req.finished_len)
        req.finished_reason, req.finished_len = None, None
    return out


def safety_finish(record: Intervention):
    """SGLang finish reason for a request the plugin ended: type "content_filter" (the
    OpenAI value for exactly this), with a message saying why. The closing record rides
    along for the trace (patches/meta_info.py moves it into the summary)."""
    from sglang.srt.managers.schedule_batch import BaseFinishReason

    class FinishedBySafety(BaseFinishReason):
        def to_json(self):
            return {"type": "content_filter", "message": STOP_MESSAGES[record.stop], "reason": record.stop,
                    STOP_RECORD: record.as_dict()}
    return FinishedBySafety()


def _ends_before_pending(req) -> bool:
    return req.finished_len is not None and req.finished_len < len(req.output_ids)


def _is_abort(reason) -> bool:
    return type(reason).__name__ == "FINISH_ABORT"

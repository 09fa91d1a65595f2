"""The finish seam on SGLang's own Req: a finish is held only while its token is unscored."""
import pytest

pytest.importorskip("sglang")

from sglang.srt.managers.schedule_batch import Req  # noqa: E402
from sglang.srt.sampling.sampling_params import SamplingParams  # noqa: E402

from tokenwise_safety.commit import RequestPolicy, RequestState  # noqa: E402
from tokenwise_safety.patches.enforce import ATTR  # noqa: E402
from tokenwise_safety.patches.held_finish import around_update_finish  # noqa: E402

EOS = 99


def request(max_new_tokens: int, output_ids: list[int], enforce: bool = True):
    params = SamplingParams(max_new_tokens=max_new_tokens)
    params.normalize(None)
    req = Req("r", "", [1, 2, 3], params, eos_token_ids={EOS})
    req.output_ids = list(output_ids)
    st = RequestState(RequestPolicy(enforce=enforce, threshold=0.5))
    setattr(req, ATTR, st)
    return req, st


def finish_check(req, new_tokens: int):
    return around_update_finish(Req.update_finish_state, req, new_tokens)


def test_a_length_finish_on_the_pending_token_is_held_then_released():
    req, st = request(4, [5, 6, 7, 8])  # the 4th token is the unscored pending one
    finish_check(req, 1)
    assert not req.finished() and st.deferred_finish[1] == 4
    st.release_finish = True  # enforce commits the pending token once its state is scored
    req.output_ids.append(9)  # the next step's token, past the cap
    finish_check(req, 1)
    assert req.finished() and req.finished_len == 4 and st.deferred_finish is None


def test_an_eos_as_the_pending_token_is_held():
    req, st = request(16, [5, 6, EOS])
    finish_check(req, 3)
    assert not req.finished() and st.deferred_finish[1] == 3


def test_a_speculative_run_past_the_cap_finishes_at_once():
    """Tokens 3 and 4 are accepted drafts, scored and judged in this verify pass; the
    bonus (the 5th, pending) is past max_new_tokens and never reaches the client."""
    req, st = request(4, [5, 6, 7, 8, 9])
    finish_check(req, 3)
    assert req.finished() and req.finished_len == 4 and st.deferred_finish is None


def test_an_accepted_eos_draft_finishes_at_once():
    req, st = request(16, [5, 6, EOS, 7])  # the bonus after the EOS draft is cut
    finish_check(req, 3)
    assert req.finished() and req.finished_len == 3 and st.deferred_finish is None


def test_shadow_requests_finish_as_sglang_decides():
    req, st = request(4, [5, 6, 7, 8], enforce=False)
    finish_check(req, 1)
    assert req.finished() and req.finished_len == 4 and st.deferred_finish is None

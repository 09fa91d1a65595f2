"""The final position's records: a held finish files them one entry past the output,
where SGLang cuts per-token lists; a speculative step can file records about a position
the client never gets."""
from tokenwise_safety.patches.trace_entries import _fold_final
from tokenwise_safety.trace import INTERVENTION_KEY, JUDGE_KEY

VETO = {"position": 3, "vetoed": [{"token": 7, "score": 1.0}], "replacement": 9, "pivot": False, "stop": None}


def test_held_finish_records_move_into_the_last_kept_entry():
    info = {INTERVENTION_KEY: [None, None, None, None, VETO],
            JUDGE_KEY: [None, None, None, [{"position": 2}], [{"position": 3}]]}
    _fold_final(info, kept=4)
    assert info[INTERVENTION_KEY][3] == VETO
    assert info[JUDGE_KEY][3] == [{"position": 2}, {"position": 3}]


def test_records_past_the_output_are_dropped():
    past = dict(VETO, position=4)  # a drafted 5th token when max_tokens is 4
    info = {INTERVENTION_KEY: [None, None, None, None, past],
            JUDGE_KEY: [None, None, None, None, [{"position": 4}, {"position": 3}]]}
    _fold_final(info, kept=4)
    assert info[INTERVENTION_KEY][3] is None
    assert info[JUDGE_KEY][3] == [{"position": 3}]


def test_an_intervention_never_overwrites_one_already_kept():
    kept_one = dict(VETO, position=2)
    info = {INTERVENTION_KEY: [None, None, None, kept_one, VETO]}
    assert _fold_final(info, kept=4) == [VETO]  # left for the finish reason to carry
    assert info[INTERVENTION_KEY][3] == kept_one


def test_interventions_no_entry_holds_ride_in_the_finish_reason():
    from sglang.srt.managers.schedule_batch import FINISH_LENGTH

    from tokenwise_safety.patches.enforce import LATE_RECORDS
    from tokenwise_safety.patches.trace_entries import _send_with_finish

    class Req:
        finished_reason = FINISH_LENGTH(length=4)
    req = Req()
    _send_with_finish(req, [VETO])
    assert req.finished_reason.to_json() == {"type": "length", "length": 4, LATE_RECORDS: [VETO]}
    plain = Req()
    plain.finished_reason = FINISH_LENGTH(length=4)
    _send_with_finish(plain, [])
    assert plain.finished_reason.to_json() == {"type": "length", "length": 4}


def test_a_stop_keeps_the_judge_passes_of_the_withheld_token():
    """The plugin ends the request at position 3 (not emitted): the judge pass of that step,
    whose verdict confirmed the veto, moves into the last emitted entry."""
    from tokenwise_safety.patches.trace_entries import _cut_at_stop
    from tokenwise_safety.trace import TRACE_KEY
    info = {TRACE_KEY: [0.1, 0.2, 0.3, 0.99], INTERVENTION_KEY: [None, None, None, None],
            JUDGE_KEY: [None, [{"position": 1}], None, [{"position": 3, "effect": "confirmed"}]]}
    _cut_at_stop(info, kept=3)
    assert info[TRACE_KEY] == [0.1, 0.2, 0.3] and info[INTERVENTION_KEY] == [None, None, None]
    assert info[JUDGE_KEY] == [None, [{"position": 1}], [{"position": 3, "effect": "confirmed"}]]
    nothing_emitted = {TRACE_KEY: [0.99], JUDGE_KEY: [[{"position": 0}]]}
    _cut_at_stop(nothing_emitted, kept=0)
    assert nothing_emitted == {TRACE_KEY: [], JUDGE_KEY: []}


def test_a_stop_folds_the_last_emitted_positions_intervention():
    """The plugin ends the request at position 3: position 2's re-draw, filed at entry 3
    (where its replacement was scored), moves into entry 2 instead of being cut; where
    entry 2 already holds position 1's record it is returned, for the finish reason."""
    from tokenwise_safety.patches.trace_entries import _cut_at_stop
    redraw, before = dict(VETO, position=2), dict(VETO, position=1)
    stop = dict(VETO, position=3, replacement=None, stop="grammar")
    info = {INTERVENTION_KEY: [None, None, None, redraw, stop]}
    assert _cut_at_stop(info, kept=3) == []
    assert info[INTERVENTION_KEY] == [None, None, redraw]
    both = {INTERVENTION_KEY: [None, None, before, redraw, stop]}
    assert _cut_at_stop(both, kept=3) == [redraw]
    assert both[INTERVENTION_KEY] == [None, None, before]

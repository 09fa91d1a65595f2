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
    _fold_final(info, kept=4)
    assert info[INTERVENTION_KEY][3] == kept_one

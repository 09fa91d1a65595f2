import numpy as np

from tokenwise_safety import calibrate
from tokenwise_safety.scoring import last_positions
from tokenwise_safety.trace import judged_harmful, summarize

import torch


def test_summary_marks_first_position_at_or_over_threshold():
    s = summarize([0.1, 0.2, 0.7, 0.4, 0.9], threshold=0.7, mode="shadow")
    assert s["prompt_score"] == 0.1
    assert s["max_score"] == 0.9
    assert s["first_over_threshold"] == 2
    assert s["num_over_threshold"] == 2
    assert s["num_scored"] == 5


def test_summary_of_clean_trace_has_no_crossing():
    s = summarize([0.1, None, 0.3], threshold=0.5, mode="shadow")
    assert s["first_over_threshold"] is None and s["num_over_threshold"] == 0
    assert s["num_scored"] == 2 and s["max_score"] == 0.3


def test_last_positions_picks_each_requests_last_row_in_full_mode():
    hidden = torch.arange(10.0).reshape(5, 2)  # rows 0..4; requests extend 2 and 3 tokens
    assert last_positions(hidden, [2, 3]).tolist() == [[2.0, 3.0], [8.0, 9.0]]
    assert last_positions(hidden[:2], [2, 3]) is not None
    assert torch.equal(last_positions(hidden, None), hidden)


def test_window_two_needs_two_consecutive_positions_over():
    scores = [0.9, 0.2, 0.8, 0.3, 0.8, 0.9, 0.95]
    # the prompt (position 0) has nothing before it and is judged alone
    assert judged_harmful(scores, 0.7, window=2) == [0, 5, 6]
    assert judged_harmful(scores, 0.7, window=1) == [0, 2, 4, 5, 6]
    assert judged_harmful(scores, 0.7, window=3) == [0, 6]
    assert judged_harmful([0.1, None, 0.9, 0.9], 0.5, window=2) == [3]
    s = summarize(scores, threshold=0.7, mode="shadow", window=2)
    assert (s["first_over_threshold"], s["num_over_threshold"], s["window"]) == (0, 3, 2)


def test_parent_table_applies_the_same_window_rule_batched():
    from tokenwise_safety.patches.enforce import ParentTable
    table = ParentTable(slots=4, k=2, window=2, device="cpu")
    slots = torch.tensor([1, 3])
    seqs = [[0.9, 0.2, 0.8, 0.3, 0.8, 0.9, 0.95], [0.1, 0.8, 0.9, 0.1, 0.1, 0.1, 0.1]]
    judged = []
    for step in range(7):
        scores = torch.tensor([seq[step] for seq in seqs])
        j = table.judged(slots, scores, fresh=torch.full((2,), step == 0))
        table.commit(slots, torch.ones(2, dtype=torch.bool), scores)
        judged.append((j >= 0.7).tolist())
    offline = calibrate.judged(np.array(seqs), window=2) >= 0.7  # the calibration's copy of the rule
    for row, seq in enumerate(seqs):
        assert [i for i, flags in enumerate(judged) if flags[row]] == judged_harmful(seq, 0.7, window=2)
        assert list(np.flatnonzero(offline[row])) == judged_harmful(seq, 0.7, window=2)


INTERVENTIONS = [
    {"position": 0, "vetoed": [{"prompt_score": 0.93}], "replacement": 11, "pivot": True},
    {"position": 4, "vetoed": [{"token": 7, "score": 0.8}, {"token": 9, "score": 0.7}], "replacement": 5,
     "pivot": False},
    {"position": 9, "vetoed": [{"token": 3, "score": 0.9}], "replacement": None, "pivot": False,
     "stop": "second_pivot"},
]


def test_decisions_detail_shows_no_score_and_no_withheld_token():
    from tokenwise_safety.trace import redact_summary
    full = summarize([0.93, 0.1, 0.2, 0.3, 0.8], 0.6, "enforce", INTERVENTIONS)
    shown = redact_summary(full, "decisions")
    assert shown == {"mode": "enforce", "threshold": 0.6, "window": 1, "first_over_threshold": 0,
                     "num_over_threshold": 2, "num_scored": 5, "num_vetoes": 3, "pivot_used": True,
                     "interventions": [{"position": 0, "pivot": True}, {"position": 4, "pivot": False},
                                       {"position": 9, "pivot": False, "stop": "second_pivot"}]}
    assert full["max_score"] == 0.93 and full["interventions"] == INTERVENTIONS  # the server's copy is intact


def test_scores_detail_drops_only_the_withheld_token_ids():
    from tokenwise_safety.trace import redact_intervention, redact_summary
    full = summarize([0.93, 0.1, 0.2, 0.3, 0.8], 0.6, "enforce", INTERVENTIONS)
    shown = redact_summary(full, "scores")
    assert {k: v for k, v in shown.items() if k != "interventions"} == \
        {k: v for k, v in full.items() if k != "interventions"}
    assert shown["interventions"] == [
        {"position": 0, "vetoed": [{"prompt_score": 0.93}], "replacement": 11, "pivot": True},
        {"position": 4, "vetoed": [{"score": 0.8}, {"score": 0.7}], "replacement": 5, "pivot": False},
        {"position": 9, "vetoed": [{"score": 0.9}], "replacement": None, "pivot": False, "stop": "second_pivot"}]
    assert redact_intervention(None, "scores") is None


def test_full_detail_is_the_whole_trace():
    from tokenwise_safety.trace import redact_intervention, redact_summary
    full = summarize([0.93, 0.1], 0.6, "enforce", INTERVENTIONS)
    assert redact_summary(full, "full") == full
    assert redact_intervention(INTERVENTIONS[1], "full") == INTERVENTIONS[1]

from tokenwise_safety.scoring import last_positions
from tokenwise_safety.trace import summarize

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

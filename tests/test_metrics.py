"""Reading counters back from a /metrics page."""
from tokenwise_safety.metrics import sample_totals

PAGE = """# HELP tokenwise_safety_judge_calls_total Judge passes.
# TYPE tokenwise_safety_judge_calls_total counter
tokenwise_safety_judge_calls_total{effect="none"} 2.0
tokenwise_safety_judge_calls_total{effect="confirmed"} 3.0
tokenwise_safety_judge_calls_created{effect="none"} 1.7e9
# HELP tokenwise_safety_spec_accept_length Accepted.
# TYPE tokenwise_safety_spec_accept_length histogram
tokenwise_safety_spec_accept_length_bucket{le="1.0"} 4.0
tokenwise_safety_spec_accept_length_count 4.0
tokenwise_safety_spec_accept_length_sum 9.5
"""


def test_sample_totals_sum_label_sets_and_keep_sample_names_apart():
    totals = sample_totals(PAGE)
    assert totals["tokenwise_safety_judge_calls_total"] == 5.0
    assert totals["tokenwise_safety_spec_accept_length_count"] == 4.0
    assert totals["tokenwise_safety_spec_accept_length_sum"] == 9.5
    assert "tokenwise_safety_draft_vetoes_total" not in totals

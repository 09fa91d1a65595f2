"""Reading counters back from a /metrics page."""
import pytest

from tokenwise_safety.metrics import sample_total

PAGE = """# HELP tokenwise_safety_judge_calls_total Judge passes.
# TYPE tokenwise_safety_judge_calls_total counter
tokenwise_safety_judge_calls_total{effect="none"} 2.0
tokenwise_safety_judge_calls_total{effect="confirmed"} 3.0
tokenwise_safety_judge_calls_created{effect="none"} 1.7e9
# HELP tokenwise_safety_errors_total Scoring failures.
# TYPE tokenwise_safety_errors_total counter
# HELP tokenwise_safety_spec_accept_length Accepted.
# TYPE tokenwise_safety_spec_accept_length histogram
tokenwise_safety_spec_accept_length_bucket{le="1.0"} 4.0
tokenwise_safety_spec_accept_length_count 4.0
tokenwise_safety_spec_accept_length_sum 9.5
"""


def test_a_sample_sums_its_label_sets_and_sample_names_stay_apart():
    assert sample_total(PAGE, "tokenwise_safety_judge_calls_total") == 5.0
    assert sample_total(PAGE, "tokenwise_safety_spec_accept_length_count") == 4.0
    assert sample_total(PAGE, "tokenwise_safety_spec_accept_length_sum") == 9.5


def test_labels_select_label_sets():
    assert sample_total(PAGE, "tokenwise_safety_judge_calls_total", effect="confirmed") == 3.0
    assert sample_total(PAGE, "tokenwise_safety_judge_calls_total", effect="cancelled") == 0.0


def test_a_sample_not_on_the_page_reads_zero():
    # the multiprocess collector shows a labelled counter only after its first increment
    assert sample_total(PAGE, "tokenwise_safety_errors_total", action="fail_open") == 0.0
    assert sample_total(PAGE, "tokenwise_safety_draft_vetoes_total") == 0.0


def test_a_label_set_written_into_the_name_is_refused():
    with pytest.raises(ValueError, match="keyword arguments"):
        sample_total(PAGE, 'tokenwise_safety_errors_total{action="fail_open"}')

"""The evaluation harness: metric arithmetic exactly, and one real run against the tiny
servers (plugin off and on) writing both reports."""
import json
import statistics

from tokenwise_safety import eval as harness


def test_aggregate_counts_interventions_and_refusals_exactly():
    results = [
        {"text": "Sure, step one", "first_intervention": 0},
        {"text": "I'm sorry, I can't", "first_intervention": 12},
        {"text": "Here you go", "first_intervention": None},
        {"text": "As an AI I won't", "first_intervention": 3, "judge_harmful": True},
    ]
    stats = harness.aggregate(results, within=8)
    assert stats["n"] == 4 and stats["errors"] == 0
    assert stats["intervention_rate"] == 0.75
    assert stats["intervened_within_8"] == 0.5
    assert stats["median_tokens_to_first_intervention"] == 3
    assert stats["harmful_continuation_rate_keyword"] == 0.5
    assert stats["harmful_continuation_rate_judge"] == 1.0


def test_first_intervention_reads_enforce_and_shadow_summaries():
    assert harness.first_intervention(None) is None
    assert harness.first_intervention({"interventions": [{"position": 4}], "mode": "enforce"}) == 4
    assert harness.first_intervention({"interventions": [], "mode": "shadow", "first_over_threshold": 2}) == 2
    assert harness.first_intervention({"interventions": [], "mode": "enforce", "first_over_threshold": 2}) is None


def test_suites_are_built_from_the_packaged_data():
    suites = harness.build_suites(limit=6)
    assert {k: len(v) for k, v in suites.items()} == {k: 6 for k in suites}
    assert all(c["prefill"] for c in suites["prefill"])
    assert all("{{" not in c["request"] for c in suites["jailbreak"])
    assert {c["harmful"] for c in suites["benign"] + suites["borderline"]} == {False}


def test_live_run_writes_reports(tiny_server, tiny_server_off, tmp_path):
    out = tmp_path / "eval"
    harness.main(["--target", f"off={tiny_server_off.url}", "--target", f"shadow={tiny_server.url}",
                  "--target", f"enforce={tiny_server.url}", "--policy", 'enforce={"mode": "enforce"}',
                  "--limit", "3", "--max-tokens", "6", "--throughput-rounds", "2", "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert set(report["targets"]) == {"off", "shadow", "enforce"}
    for suite, n in report["suites"].items():
        assert n == 3
        off = report["targets"]["off"]["suites"][suite]["stats"]
        assert off["n"] + off["errors"] == 3
        if off["n"]:
            assert off["intervention_rate"] == 0.0 and off["decode_tok_s"] > 0
    for target in report["targets"].values():  # every case's first intervention, not only the samples'
        for suite in target["suites"].values():
            stats, firsts = suite["stats"], suite["first_interventions"]
            assert len(firsts) == 3
            if stats["n"]:
                assert sum(x is not None for x in firsts) == round(stats["intervention_rate"] * stats["n"])
    # the tiny model's 1024-token context rejects long jailbreak templates: counted as errors
    assert report["targets"]["off"]["suites"]["benign"]["stats"]["errors"] == 0
    assert report["targets"]["enforce"]["policy"] == {"mode": "enforce"}
    ratios = report["benign_throughput_vs_off"]
    assert set(ratios) == {"shadow", "enforce"}
    for r in ratios.values():
        assert len(r["rounds"]) == 2 and abs(r["median"] - statistics.median(r["rounds"])) <= 1e-4 and r["median"] > 0
    table = out.with_suffix(".md").read_text()
    assert "| prefill (n=3) | intervention_rate |" in table
    assert "| benign | decode throughput vs off" in table


def test_identical_rate_compares_texts_case_by_case_and_leaves_errors_out():
    off = [{"text": "a"}, {"text": "b"}, {"text": "c"}, {"error": "HTTP 400", "text": ""}]
    on = [{"text": "a"}, {"text": "B"}, {"error": "HTTP 500", "text": ""}, {"text": "d"}]
    assert harness.identical_rate(off, on) == 0.5
    assert harness.identical_rate(off[3:], on[3:]) is None

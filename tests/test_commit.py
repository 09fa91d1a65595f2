"""The batched re-draw against plain per-row references, and the request state machine."""
import pytest
import torch

from tokenwise_safety.commit import RequestPolicy, RequestState, redraw

#   candidates (sorted by logit)      vetoed
#   row 0: [7, 3, 9, 4]  logits 4 3 2 1   7        -> greedy picks 3
#   row 1: [2, 8, 6, 1]  logits 5 4 3 0   2, 8     -> greedy picks 6
#   row 2: [5, 0, 1, 3]  logits 9 1 0 0   all      -> exhausted
IDS = torch.tensor([[7, 3, 9, 4], [2, 8, 6, 1], [5, 0, 1, 3]])
LOGITS = torch.tensor([[4.0, 3, 2, 1], [5.0, 4, 3, 0], [9.0, 1, 0, 0]])
VETOED = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)


def _redraw(greedy, temperature=1.0, top_p=1.0, top_k=0, seed=0):
    n = IDS.shape[0]
    return redraw(LOGITS, IDS, VETOED, torch.full((n,), temperature), torch.full((n,), top_p),
                  torch.full((n,), top_k), torch.full((n,), greedy, dtype=torch.bool),
                  torch.Generator().manual_seed(seed))


def test_greedy_takes_the_best_remaining_candidate():
    tokens, exhausted = _redraw(greedy=True)
    assert tokens[:2].tolist() == [3, 6]
    assert exhausted.tolist() == [False, False, True]


def test_sampling_matches_the_renormalised_parent_distribution():
    counts = torch.zeros(10)
    for seed in range(4000):
        tokens, _ = _redraw(greedy=False, seed=seed)
        counts[tokens[0]] += 1
    expected = torch.softmax(torch.tensor([3.0, 2, 1]), 0)  # row 0 without the vetoed 7
    observed = counts[[3, 9, 4]] / counts.sum()
    assert torch.allclose(observed, expected, atol=0.03)
    assert counts[7] == 0


def test_top_p_and_top_k_narrow_the_remaining_candidates():
    for seed in range(200):
        tokens, _ = _redraw(greedy=False, top_p=0.5, seed=seed)
        assert tokens[0] == 3 and tokens[1] == 6  # the first remaining candidate holds > 50%
        tokens, exhausted = _redraw(greedy=False, top_k=1, seed=seed)
        assert exhausted[0] and exhausted[1]  # the request's own top-1 was vetoed


def test_pivot_forcing_walks_the_pivot_then_releases():
    st = RequestState(RequestPolicy(enforce=True, threshold=0.5), pivot_ids=[11, 12, 13])
    assert st.start_pivot(4, [{"token": 7, "score": 0.9}]) == 11
    assert st.pending_forced and st.open.pivot and st.open.position == 4
    assert [st.next_forced(), st.next_forced(), st.next_forced()] == [12, 13, None]
    assert not st.pending_forced


#   row 0: [7, 3, 9, 4]  logits 4 -inf -inf -inf (a grammar allows only 7)   7 vetoed
#   row 1: [2, 8, 6, 1]  logits 5 4 -inf -inf                                 2 vetoed
GRAMMAR_LOGITS = torch.tensor([[4.0, -float("inf"), -float("inf"), -float("inf")],
                               [5.0, 4, -float("inf"), -float("inf")]])
GRAMMAR_VETOED = torch.tensor([[1, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)


@pytest.mark.parametrize("greedy", [True, False])
def test_forbidden_candidates_count_as_exhausted_not_as_choices(greedy):
    """SGLang masks grammar-forbidden tokens to -inf before the parent's top-k is kept:
    a row whose allowed candidates were all vetoed is exhausted (-> pivot), and
    multinomial never sees an all-zero row (it used to raise and kill the scheduler)."""
    for seed in range(50):
        tokens, exhausted = redraw(GRAMMAR_LOGITS, IDS[:2], GRAMMAR_VETOED, torch.ones(2), torch.ones(2),
                                   torch.zeros(2, dtype=torch.long), torch.full((2,), greedy),
                                   torch.Generator().manual_seed(seed))
        assert exhausted.tolist() == [True, False]
        assert int(tokens[1]) == 8  # the one finite, unvetoed candidate


def test_greedy_rows_never_reach_multinomial(monkeypatch):
    def boom(*a, **kw):
        raise AssertionError("multinomial called for greedy rows")
    monkeypatch.setattr(torch, "multinomial", boom)
    tokens, exhausted = redraw(GRAMMAR_LOGITS, IDS[:2], GRAMMAR_VETOED, torch.ones(2), torch.ones(2),
                               torch.zeros(2, dtype=torch.long), torch.ones(2, dtype=torch.bool))
    assert exhausted.tolist() == [True, False] and int(tokens[1]) == 8

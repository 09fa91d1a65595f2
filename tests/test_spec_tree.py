"""Draft-tree rules at speculative verify (plugin/spec_tree.py) against sequential references,
on every available device (the CUDA cases skip where there is no GPU): the plugin runs these
functions on the verify batch's own device. The verify itself is the CPU stand-in of
sgl_kernel's verify_tree_greedy, fed CPU copies of the masked tensors (it is CPU code; the real
CUDA kernels run under the same masks in bench/spec_verify_cuda.py)."""
import random

import pytest
import torch

from tokenwise_safety.spec_tree import (force_in_parent_rows, forced_chain, judged_along_paths, mask_in_parent_rows,
                                        parents_of, shift_in, unmask_drawn)
from tokenwise_safety.trace import judged_harmful

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))]


def random_tree(d: int, rng: random.Random) -> list[int]:
    """Parent of each node (node 0: the root, -1), nodes numbered in BFS-like order."""
    return [-1] + [rng.randrange(0, j) for j in range(1, d)]


def links_of(parents: list[int]) -> tuple[list[int], list[int]]:
    """SGLang's first-child / next-sibling links of a parent list."""
    d = len(parents)
    first, sibling = [-1] * d, [-1] * d
    last_child = {}
    for j in range(1, d):
        p = parents[j]
        if first[p] == -1:
            first[p] = j
        else:
            sibling[last_child[p]] = j
        last_child[p] = j
    return first, sibling


@pytest.mark.parametrize("device", DEVICES)
def test_parents_and_depths_from_links(device):
    rng = random.Random(0)
    for _ in range(200):
        b, d = rng.randint(1, 4), rng.randint(1, 12)
        trees = [random_tree(d, rng) for _ in range(b)]
        links = [links_of(t) for t in trees]
        parent, depth = parents_of(torch.tensor([l[0] for l in links], device=device),
                                   torch.tensor([l[1] for l in links], device=device))
        assert parent.device.type == depth.device.type == device
        assert parent.tolist() == trees
        for t, dep in zip(trees, depth.tolist()):
            for j, p in enumerate(t):
                assert dep[j] == (0 if p < 0 else dep[p] + 1)


def path_to(parents: list[int], j: int) -> list[int]:
    path = [j]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


@pytest.mark.parametrize("device", DEVICES)
def test_window_rule_along_each_path_equals_the_sequential_rule(device):
    """A node is judged over exactly when the sequential rule (trace.judged_harmful) flags
    the last position of history + its root-to-node path."""
    rng = random.Random(1)
    for _ in range(300):
        b, d, window = rng.randint(1, 3), rng.randint(1, 10), rng.randint(1, 4)
        thr = 0.5
        trees = [random_tree(d, rng) for _ in range(b)]
        links = [links_of(t) for t in trees]
        scores = torch.tensor([[rng.choice([0.1, 0.7, 0.9]) for _ in range(d)] for _ in range(b)])
        hist_len = [rng.randint(0, window + 1) for _ in range(b)]
        hist = [[rng.choice([0.2, 0.8]) for _ in range(n)] for n in hist_len]
        recent = torch.full((b, window - 1), float("inf"))
        for i, h in enumerate(hist):
            tail = h[-(window - 1):] if window > 1 else []
            if tail:
                recent[i, window - 1 - len(tail):] = torch.tensor(tail)
        parent, depth = parents_of(torch.tensor([l[0] for l in links], device=device),
                                   torch.tensor([l[1] for l in links], device=device))
        judged = judged_along_paths(scores.to(device), parent, depth, recent.to(device)).cpu()
        for i in range(b):
            for j in range(d):
                seq = hist[i] + [float(scores[i, n]) for n in path_to(trees[i], j)]
                want = (len(seq) - 1) in judged_harmful(seq, thr, window)
                # judged_harmful treats a short history as "as many as exist" from the
                # answer's start; a fresh request's history is +inf: the same.
                assert bool(judged[i, j] >= thr) == want, (trees[i], hist[i], scores[i].tolist(), j, window)


@pytest.mark.parametrize("device", DEVICES)
def test_shift_in_keeps_the_last_committed_scores(device):
    recent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], device=device)
    new = torch.tensor([[7.0, 8.0, 0.0], [9.0, 0.0, 0.0]], device=device)
    out = shift_in(recent, new, torch.tensor([2, 1], device=device))
    assert out.tolist() == [[3.0, 7.0, 8.0], [5.0, 6.0, 9.0]]
    assert shift_in(torch.zeros(2, 0, device=device), new, torch.tensor([1, 1], device=device)).shape == (2, 0)


def _verify_cpu(first, sibling, tokens, logits, d):
    """The CPU stand-in of verify_tree_greedy over CPU copies of (possibly CUDA) tensors."""
    from test_spec_kernels import ops

    predicts, accept_index, accept_num = torch.full((d,), -1), torch.full((1, d), -1), torch.zeros(1, dtype=torch.long)
    ops.verify_tree_greedy_cpu(predicts, accept_index, accept_num, tokens.cpu(), torch.arange(d)[None],
                               torch.tensor([first]), torch.tensor([sibling]), logits.argmax(dim=-1).cpu())
    return predicts, accept_index, accept_num


def _verify_after_veto(vetoed_nodes: list[int], with_sibling: bool, device: str = "cpu"):
    """A real verify (the CPU stand-in of sgl_kernel's verify_tree_greedy) of one request's
    tree after the veto masks. Nodes: 0 root, 1 = A (child of 0), 2 = B (child of 1),
    3 = C (child of 1, B's sibling), 4 = D (child of 2). The target's rows rank A after the
    root, B then C after A, D after B, 5 after C, 6 after D: unvetoed, A B D are accepted."""
    first, sibling = [1, 2, 4, -1, -1], [-1, -1, 3 if with_sibling else -1, -1, -1]
    tokens = torch.tensor([[9, 1, 2, 3, 4]], device=device)
    logits = torch.zeros(5, 10, device=device)
    for row, ranked in enumerate([[1], [2, 3], [4], [5], [6]]):
        for rank, tok in enumerate(ranked):
            logits[row, tok] = 10.0 - rank
    parent, _ = parents_of(torch.tensor([first], device=device), torch.tensor([sibling], device=device))
    blocked = torch.zeros(1, 5, dtype=torch.bool, device=device)
    blocked[0, vetoed_nodes] = True
    rows, toks, saved = mask_in_parent_rows(logits, parent, tokens, blocked)
    predicts, accept_index, accept_num = _verify_cpu(first, sibling, tokens, logits, 5)
    return int(accept_num[0]), accept_index[0].tolist(), predicts.tolist(), (rows.tolist(), toks.tolist(), saved.tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_a_veto_inside_the_tree_cuts_acceptance_at_the_vetoed_node(device):
    """Unvetoed, A B D are accepted and the bonus comes from D's row. Vetoing B masks B in
    A's row: acceptance stops after A, and the token kept after A is the corrected row's
    best, C, drawn from the target's logits (the re-draw), not from the draft."""
    assert _verify_after_veto([], with_sibling=False, device=device)[:2] == (3, [0, 1, 2, 4, -1])
    accepted, index, predicts, masked = _verify_after_veto([2], with_sibling=False, device=device)
    assert masked == ([1], [2], [10.0])  # B's logit in its parent's (A's) row, kept for the record
    assert (accepted, index[:2]) == (1, [0, 1])
    assert predicts[1] == 3  # after A: the corrected row's best


@pytest.mark.parametrize("device", DEVICES)
def test_a_harmless_sibling_of_a_vetoed_node_is_accepted_and_continued(device):
    """What harmless-first drafting relies on: with C drafted beside the vetoed B, the
    corrected row's best is C, so verification accepts C and goes on below it."""
    accepted, index, predicts, _ = _verify_after_veto([2], with_sibling=True, device=device)
    assert (accepted, index[:3]) == (2, [0, 1, 3])
    assert predicts[1] == 3 and predicts[3] == 5  # C accepted; the bonus from C's row


@pytest.mark.parametrize("device", DEVICES)
def test_forced_chain_follows_the_pivot_from_the_root(device):
    """Row 0: a chain 9 -> 5 -> 6 -> 7 spelling the queue [5, 6, 8]: nodes 1 and 2 (node 3
    carries 7, not 8). Row 1: a tree whose root has children 4 and 5 (the second spells
    the queue's 5) and 5 a child 6: nodes 2 and 3. Row 2: no queue. Row 3: the queue's first
    token is not drafted at all."""
    first = torch.tensor([[1, 2, 3, -1], [1, -1, 3, -1], [1, 2, 3, -1], [1, 2, 3, -1]], device=device)
    sibling = torch.tensor([[-1, -1, -1, -1], [-1, 2, -1, -1], [-1, -1, -1, -1], [-1, -1, -1, -1]], device=device)
    parent, depth = parents_of(first, sibling)
    tokens = torch.tensor([[9, 5, 6, 7], [9, 4, 5, 6], [9, 5, 6, 7], [9, 1, 5, 6]], device=device)
    queue = torch.tensor([[5, 6, 8], [5, 6, -1], [-1, -1, -1], [5, 6, -1]], device=device)
    forced = forced_chain(tokens, parent, depth, queue)
    assert forced.tolist() == [[False, True, True, False], [False, False, True, True],
                               [False] * 4, [False] * 4]
    assert not forced_chain(tokens, parent, depth, torch.zeros(4, 0, dtype=torch.long, device=device)).any()


@pytest.mark.parametrize("device", DEVICES)
def test_forced_nodes_are_accepted_by_verify_and_their_rows_put_back(device):
    """A chain root -> 5 -> 6 -> 2 whose target rows rank other tokens first: forcing nodes 1
    and 2 makes the real verify (CPU stand-in of verify_tree_greedy) accept both, and the
    bonus after node 2 comes from its own unforced row (token 3, not the drafted 2)."""
    first, sibling = [1, 2, 3, -1], [-1, -1, -1, -1]
    tokens = torch.tensor([[9, 5, 6, 2]], device=device)
    logits = torch.zeros(4, 10, device=device)
    for row, best in enumerate([1, 1, 3, 4]):
        logits[row, best] = 10.0
    before = logits.clone()
    parent, _ = parents_of(torch.tensor([first], device=device), torch.tensor([sibling], device=device))
    forced = torch.tensor([[False, True, True, False]], device=device)
    rows, saved = force_in_parent_rows(logits, parent, tokens, forced)
    assert rows.tolist() == [0, 1]
    assert torch.isinf(logits[0]).sum() == 9 and logits[0, 5] == 0.0 and logits[1, 6] == 0.0
    predicts, accept_index, accept_num = _verify_cpu(first, sibling, tokens, logits, 4)
    assert int(accept_num[0]) == 2 and accept_index[0].tolist()[:3] == [0, 1, 2]
    assert predicts.tolist()[:3] == [5, 6, 3]
    logits[rows] = saved
    assert torch.equal(logits, before)


@pytest.mark.parametrize("device", DEVICES)
def test_a_masked_token_drawn_as_the_bonus_is_replaced_by_the_rows_best(device):
    """SGLang's sampled verify falls back to token vocab-1 when nothing is left to sample,
    whatever its logit (seen on the H200: bench/spec_verify_cuda.py). The commit keeps the
    row's best finite token instead; a finite draw is left alone."""
    logits = torch.tensor([[0.0, 2.0, 1.0, 0.5], [0.0, 2.0, 1.0, 0.5], [3.0, 0.0, 1.0, 0.5]], device=device)
    parent = torch.tensor([[-1, 0, 0]], device=device)
    tokens = torch.tensor([[0, 3, 1]], device=device)
    mask_in_parent_rows(logits, parent, tokens, torch.tensor([[False, True, True]], device=device))
    rows = torch.tensor([0, 2], device=device)
    drawn = torch.tensor([3, 2], dtype=torch.int32, device=device)  # row 0: the vetoed 3; row 2: finite
    assert unmask_drawn(logits, rows, drawn) == 1
    assert drawn.tolist() == [2, 2] and drawn.dtype == torch.int32

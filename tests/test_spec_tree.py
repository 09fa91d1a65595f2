"""Draft-tree rules at speculative verify (plugin/spec_tree.py) against sequential references."""
import random

import torch

from tokenwise_safety.spec_tree import judged_along_paths, parents_of, shift_in
from tokenwise_safety.trace import judged_harmful


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


def test_parents_and_depths_from_links():
    rng = random.Random(0)
    for _ in range(200):
        b, d = rng.randint(1, 4), rng.randint(1, 12)
        trees = [random_tree(d, rng) for _ in range(b)]
        links = [links_of(t) for t in trees]
        parent, depth = parents_of(torch.tensor([l[0] for l in links]), torch.tensor([l[1] for l in links]))
        assert parent.tolist() == trees
        for t, dep in zip(trees, depth.tolist()):
            for j, p in enumerate(t):
                assert dep[j] == (0 if p < 0 else dep[p] + 1)


def path_to(parents: list[int], j: int) -> list[int]:
    path = [j]
    while parents[path[-1]] >= 0:
        path.append(parents[path[-1]])
    return path[::-1]


def test_window_rule_along_each_path_equals_the_sequential_rule():
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
        parent, depth = parents_of(torch.tensor([l[0] for l in links]), torch.tensor([l[1] for l in links]))
        judged = judged_along_paths(scores, parent, depth, recent)
        for i in range(b):
            for j in range(d):
                seq = hist[i] + [float(scores[i, n]) for n in path_to(trees[i], j)]
                want = (len(seq) - 1) in judged_harmful(seq, thr, window)
                # judged_harmful treats a short history as "as many as exist" from the
                # answer's start; a fresh request's history is +inf: the same.
                assert bool(judged[i, j] >= thr) == want, (trees[i], hist[i], scores[i].tolist(), j, window)


def test_shift_in_keeps_the_last_committed_scores():
    recent = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    new = torch.tensor([[7.0, 8.0, 0.0], [9.0, 0.0, 0.0]])
    out = shift_in(recent, new, torch.tensor([2, 1]))
    assert out.tolist() == [[3.0, 7.0, 8.0], [5.0, 6.0, 9.0]]
    assert shift_in(torch.zeros(2, 0), new, torch.tensor([1, 1])).shape == (2, 0)

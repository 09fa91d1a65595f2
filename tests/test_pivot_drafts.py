"""A forced pivot placed as NGRAM drafts (patches/pivot_drafts.py): the rewritten drafts and
tree mask are a chain from the root that SGLang's tree reconstruction reads back as one."""
import numpy as np
import torch

from tokenwise_safety.patches.pivot_drafts import chain_drafts
from tokenwise_safety.spec_tree import parents_of

from test_spec_kernels import ops


def test_pivot_tokens_replace_one_requests_drafts_as_a_chain():
    d = 4
    drafts = np.array([7, 1, 2, 3, 8, 4, 5, 6], dtype=np.int64)  # two requests, roots 7 and 8
    mask = np.zeros(2 * d * d, dtype=np.uint8)
    tree = mask.reshape(2, d, d)
    tree[:, :, 0] = 1
    tree[:, np.arange(d), np.arange(d)] = 1  # every draft a child of the root
    chain_drafts(drafts, mask, d, {1: [40, 41]})
    assert drafts.tolist() == [7, 1, 2, 3, 8, 40, 41, 41]  # filler repeats the pivot's last token
    assert (tree[1] == np.tril(np.ones((d, d)))).all() and tree[0, 3].tolist() == [1, 0, 0, 1]
    positions, index = torch.zeros(2 * d, dtype=torch.long), torch.zeros(2, d, dtype=torch.long)
    first, sibling = torch.zeros(2, d, dtype=torch.long), torch.zeros(2, d, dtype=torch.long)
    ops.reconstruct_indices_from_tree_mask(torch.from_numpy(mask).bool(), torch.tensor([10, 20]), positions, index,
                                           first, sibling, 2, d)
    parent, depth = parents_of(first, sibling)
    assert parent.tolist() == [[-1, 0, 0, 0], [-1, 0, 1, 2]]
    assert positions.tolist()[d:] == [20, 21, 22, 23]

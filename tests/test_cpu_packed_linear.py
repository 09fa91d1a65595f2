"""The CPU packed-linear seam: which multiplications it takes, and that it computes F.linear."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenwise_safety.patches import cpu_packed_linear as cpl

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")

# oneDNN's packed kernel sums the 256 products in another order than F.linear, and the order
# differs between CPUs: float32 reordering error on outputs of size ~16 reached 1.1e-5 on the CI
# machine (where cancellation left an output near 0.08). 1e-4 absolute still rejects any wrong
# weight, row or bias, which move outputs by O(1).
CLOSE = dict(rtol=1e-5, atol=1e-4)


class Layer(torch.nn.Module):
    def __init__(self, out_features=1024, in_features=256, dtype=torch.float32, bias=True):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.weight = torch.nn.Parameter(torch.randn(out_features, in_features, generator=g).to(dtype),
                                         requires_grad=False)
        self.bias = torch.nn.Parameter(torch.randn(out_features, generator=g).to(dtype), requires_grad=False) \
            if bias else None


def original(method, layer, x, bias=None, *args, **kwargs):
    original.calls += 1
    return F.linear(x, layer.weight, bias)


@pytest.fixture(autouse=True)
def _count():
    original.calls = 0


@pytest.mark.parametrize("rows", [2, 4, 8, 33])
def test_several_rows_use_the_packed_weight_and_equal_f_linear(rows):
    layer = Layer()
    assert cpl.pack(layer)
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(rows))
    got = cpl.around_linear_apply(original, None, layer, x, layer.bias)
    assert original.calls == 0
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias), **CLOSE)


def test_one_row_keeps_f_linear():
    layer = Layer()
    cpl.pack(layer)
    cpl.around_linear_apply(original, None, layer, torch.randn(1, 256), layer.bias)
    assert original.calls == 1


def test_a_weight_changed_after_packing_is_not_served_stale():
    layer = Layer()
    cpl.pack(layer)
    with torch.no_grad():
        layer.weight.mul_(2)
    x = torch.randn(4, 256)
    got = cpl.around_linear_apply(original, None, layer, x, layer.bias)
    assert original.calls == 1
    torch.testing.assert_close(got, F.linear(x, layer.weight, layer.bias))


def test_only_large_float32_cpu_weights_are_packed():
    assert not cpl.pack(Layer(dtype=torch.bfloat16))
    assert not cpl.pack(Layer(out_features=1000, in_features=64))
    layer = Layer(dtype=torch.bfloat16)
    cpl.around_linear_apply(original, None, layer, torch.randn(4, 256).bfloat16(), layer.bias)
    assert original.calls == 1


def test_lm_head_rows_use_the_packed_weight_unless_a_bias_or_out_is_given():
    head = Layer(out_features=2000, bias=False)
    cpl.pack(head)
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(4))
    calls = []

    def head_original(processor, hidden, lm_head, embedding_bias=None, **kwargs):
        calls.append(kwargs)
        return hidden @ lm_head.weight.T

    got = cpl.around_compute_lm_head(head_original, None, x, head)
    torch.testing.assert_close(got, x @ head.weight.T, **CLOSE)
    assert calls == []
    cpl.around_compute_lm_head(head_original, None, x, head, torch.zeros(2000))
    cpl.around_compute_lm_head(head_original, None, x, head, out=torch.empty(4, 2000))
    assert len(calls) == 2


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv(cpl.ENV, "0")
    assert not cpl.wanted("cpu")
    monkeypatch.delenv(cpl.ENV)
    assert not cpl.wanted("cuda")


def test_packing_only_takes_memory_sglang_leaves_past_its_activation_reserve():
    # The CI machine's Qwen 1.5B judge server (log of the failed run): 15.10 GB before loading,
    # --mem-fraction-static 0.716, 8.50 GB free after loading, 5.75 GB to pack. Packed, it left
    # the KV pool nothing and the server died; now the pool is sized first and packing must fit
    # beside the reserve.
    reserve = 15.10 * (1 - 0.716)
    assert not cpl.room_to_pack(5.75, 8.50 - 0.94, reserve)
    assert cpl.room_to_pack(5.75, 14.0, reserve)
    assert cpl.room_to_pack(0.50, 8.50 - 0.94, reserve)  # SmolLM2's 0.50 GB fits there

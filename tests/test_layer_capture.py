"""Layer taps on a plain torch stack shaped like SGLang's (model.layers[i].input_layernorm
returning (normed, hidden + residual)): what is copied, and the errors for models that
cannot be tapped. The real SGLang path is checked against transformers in test_server_tiny."""
import pytest
import torch

from tokenwise_safety.patches.layer_capture import install


class AddNorm(torch.nn.Module):
    def forward(self, hidden, residual=None):
        if residual is None:
            return hidden * 0.5  # the first layer's norm: no residual yet
        residual.add_(hidden)  # fused add-norm: the sum is written into the residual in place
        return residual * 0.5, residual


class Layer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.input_layernorm = AddNorm()


class Stack(torch.nn.Module):
    def __init__(self, n=3):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.layers = torch.nn.ModuleList(Layer() for _ in range(n))


def test_tap_copies_the_residual_sum_before_in_place_updates():
    stack = Stack()
    taps = install(stack, [2, -1])
    assert set(taps) == {2}
    hidden, residual = torch.ones(5, 4), torch.full((5, 4), 2.0)
    stack.model.layers[2].input_layernorm(hidden, residual)
    residual.add_(1000.0)  # the next layer's fused add-norm reuses the same buffer
    assert torch.equal(taps[2].rows_of(5), torch.full((5, 4), 3.0))


def test_layer_outside_the_model_is_refused():
    with pytest.raises(RuntimeError, match="probe layer 4 is outside 1..3"):
        install(Stack(), [4, -1])


def test_model_without_input_norm_is_refused():
    stack = Stack()
    del stack.model.layers[1].input_layernorm
    with pytest.raises(RuntimeError, match="no input_layernorm"):
        install(stack, [1])


def test_norm_without_residual_is_reported_at_the_forward():
    stack = Stack()
    taps = install(stack, [1])
    with pytest.raises(RuntimeError, match="returned no residual sum"):
        stack.model.layers[1].input_layernorm(torch.ones(2, 4))
    assert taps[1].buf is None

"""The MLP and LayerNorm keep less for the backward pass, with the values and gradients of the plain layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lipkit.models.layers import Block, LayerNorm, Mlp, activation


def _plain_mlp(mlp: Mlp, x: torch.Tensor) -> torch.Tensor:
    """What the MLP computes, composed from PyTorch's own modules (autograd keeps every output)."""
    return mlp.fc2(activation(mlp.fc1(x), mlp.act))


def _plain_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """The float32 LayerNorm as plain ops: upcast, normalise, cast back."""
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps).to(x.dtype)


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return list(torch.autograd.grad((out.float() * w.float()).sum(), inputs))


@pytest.mark.parametrize("act", ["gelu", "gelu_tanh", "quick_gelu"])
@pytest.mark.parametrize("shape", [(3, 5, 16), (6, 16)])
def test_mlp_equals_the_plain_composition_in_float64(act, shape):
    torch.manual_seed(0)
    mlp = Mlp(16, 40, act).double()
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    params = [x, *mlp.parameters()]
    got, want = mlp(x), _plain_mlp(mlp, x)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    for a, b in zip(_grads(got, params), _grads(want, params)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_mlp_gradcheck():
    torch.manual_seed(0)
    mlp = Mlp(6, 10, "quick_gelu").double()
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, *p: mlp(t), (x, *mlp.parameters()))


def test_mlp_under_bf16_autocast_matches_linear_layers_under_autocast():
    torch.manual_seed(0)
    mlp = Mlp(32, 128)
    x = torch.randn(4, 9, 32, requires_grad=True)
    params = [x, *mlp.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = mlp(x), _plain_mlp(mlp, x)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(_grads(got, params), _grads(want, params)):
        assert a.dtype == b.dtype  # float32 weight gradients, as autocast gives them
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-2)


def test_layer_norm_of_bf16_input_equals_the_float32_computation():
    torch.manual_seed(0)
    norm = LayerNorm(24)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(5, 7, 24).bfloat16().requires_grad_()
    params = [x, norm.weight, norm.bias]
    got, want = norm(x), _plain_layer_norm(norm, x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    for a, b in zip(_grads(got, params), _grads(want, params)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast does not change what it computes
        torch.testing.assert_close(norm(x), want, atol=0, rtol=0)


def _saved_bytes(fn, *inputs: torch.Tensor, weights: list[torch.Tensor]) -> int:
    """Bytes of activations autograd keeps for the backward pass of ``fn(*inputs)``, each storage once.

    The weights and their autocast copies (tensors of a weight's shape, or its transpose's) are not counted.
    """
    skip = {w.untyped_storage().data_ptr() for w in weights}
    weight_shapes = {w.shape for w in weights} | {w.t().shape for w in weights if w.ndim == 2}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and t.shape not in weight_shapes:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*inputs)
    return sum(kept.values())


def test_a_bf16_block_keeps_24_bytes_per_token_and_channel():
    """What a block keeps under bf16 autocast, per token, in units of the width (bytes):

    LayerNorm inputs 2 + 2, their outputs 2 + 2, q/k/v 6, attention output 2, the MLP's hidden
    activation before the nonlinearity 8 (4x width, 2 bytes): 24, plus per-token statistics (LayerNorm
    mean and 1/std, the attention's log-sum-exp per head: 0.5 here). The plain layers keep 36: float32
    copies of the LayerNorm inputs (4 + 4 instead of 2 + 2) and the nonlinearity's output (8) besides.
    """
    torch.manual_seed(0)
    width, tokens = 64, 2 * 50
    block = Block(width, 4)
    x = torch.randn(2, 50, width).bfloat16().requires_grad_()
    params = list(block.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = _saved_bytes(block, x, weights=params)
        plain = _saved_bytes(_plain_block(block), x, weights=params)
    per_token = lean / (tokens * width)
    assert per_token == 24.5
    assert plain / (tokens * width) == 36.5


def _plain_block(block: Block):
    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x + block.attn(_plain_layer_norm(block.norm1, x))
        return x + _plain_mlp(block.mlp, _plain_layer_norm(block.norm2, x))

    return forward

"""The last block computes only the pooled token: equal to the full computation, in value and gradient."""

from __future__ import annotations

import pytest
import torch

import lipkit
from lipkit.models.layers import Block, Transformer
from lipkit.models.text import pool_tokens


def _full_then_select(fn, x: torch.Tensor, index) -> torch.Tensor:
    out = fn(x)
    return out[:, index] if isinstance(index, int) else out[torch.arange(x.shape[0]), index]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("index", [0, 5, -1, "per-row"])
def test_block_forward_at_equals_the_full_block_at_that_token(causal, index):
    torch.manual_seed(0)
    block = Block(32, 4, layer_scale_init=0.5)
    x = torch.randn(3, 7, 32, requires_grad=True)
    if index == "per-row":
        index = torch.tensor([6, 0, 3])
    want = _full_then_select(lambda t: block(t, causal=causal), x, index)
    got = block.forward_at(x, index, causal=causal)
    assert got.shape == (3, 32)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    # Gradients with respect to the input tokens and every weight match too.
    w = torch.randn_like(want)
    grads_want = torch.autograd.grad((want * w).sum(), [x, *block.parameters()])
    grads_got = torch.autograd.grad((got * w).sum(), [x, *block.parameters()])
    for a, b in zip(grads_got, grads_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_causal_forward_at_ignores_later_tokens():
    torch.manual_seed(0)
    block = Block(16, 2)
    x = torch.randn(2, 6, 16)
    changed = x.clone()
    changed[:, 4:] = torch.randn(2, 2, 16)  # after position 3
    index = torch.tensor([3, 2])
    torch.testing.assert_close(block.forward_at(x, index, causal=True), block.forward_at(changed, index, causal=True))
    assert not torch.allclose(block.forward_at(x, index), block.forward_at(changed, index))


@pytest.mark.parametrize("checkpointing", [False, True])
def test_transformer_forward_pooled_equals_forward_then_select(checkpointing):
    torch.manual_seed(0)
    net = Transformer(32, 3, 4)
    net.grad_checkpointing = checkpointing
    x = torch.randn(2, 9, 32, requires_grad=True)
    for start in (0, 2, 3):  # from the bottom, from the top block, and past every block
        want = _full_then_select(lambda t, s=start: net(t, start=s), x, 0)
        got = net.forward_pooled(x, 0, start=start)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
        (gx_want,) = torch.autograd.grad(want.sum(), x)
        (gx_got,) = torch.autograd.grad(got.sum(), x)
        torch.testing.assert_close(gx_got, gx_want, atol=1e-5, rtol=1e-4)


def test_towers_pool_the_same_features_as_the_full_computation():
    torch.manual_seed(0)
    model = lipkit.create_model("micro").eval()
    images = torch.randn(3, 3, model.cfg.vision_config().image_size, model.cfg.vision_config().image_size)
    tokens = lipkit.get_tokenizer(model.cfg)(["a cat", "two dogs on a red sofa", "x"])
    with torch.no_grad():
        vis = model.visual
        assert vis.cfg.pool == "cls"
        torch.testing.assert_close(vis.features(images), vis.pool(vis.forward_features(images)), atol=1e-6, rtol=1e-5)
        text = model.text
        x = text.token_embed(tokens) + text.pos_embed[: tokens.shape[1]]
        full = text.norm(text.transformer(x, causal=text.cfg.causal))
        want = pool_tokens(full, tokens, text.cfg.pool, text.cfg.pad_id)
        torch.testing.assert_close(text.features(tokens), want, atol=1e-6, rtol=1e-5)

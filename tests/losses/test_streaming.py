from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lipkit.errors import ConfigError
from lipkit.losses import create_loss, infonce_loss, sigmoid_loss, streaming_infonce_loss, streaming_sigmoid_loss


def _inputs(n: int, d: int, dtype: torch.dtype = torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, d, generator=g, dtype=dtype) + image.detach(), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, dtype=dtype, requires_grad=True)
    bias = torch.tensor(-3.0, dtype=dtype, requires_grad=True)
    return image, text, scale, bias


def _value_and_grads(loss_fn, *inputs):
    loss = loss_fn(*inputs)
    grads = torch.autograd.grad(loss, inputs)
    return loss.detach(), grads


@pytest.mark.parametrize(("n", "tile"), [(1, 4), (7, 3), (16, 4), (33, 8), (20, 64)])
def test_streaming_infonce_equals_reference(n, tile):
    image, text, scale, _ = _inputs(n, 12)
    ref, ref_grads = _value_and_grads(infonce_loss, image, text, scale)
    got, got_grads = _value_and_grads(lambda i, t, s: streaming_infonce_loss(i, t, s, tile), image, text, scale)
    assert torch.allclose(got.double(), ref, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a.double(), b, atol=1e-5)


@pytest.mark.parametrize(("n", "tile"), [(1, 4), (7, 3), (16, 4), (33, 8)])
def test_streaming_sigmoid_equals_reference(n, tile):
    image, text, scale, bias = _inputs(n, 12)
    ref, ref_grads = _value_and_grads(sigmoid_loss, image, text, scale, bias)
    got, got_grads = _value_and_grads(
        lambda i, t, s, b: streaming_sigmoid_loss(i, t, s, b, tile), image, text, scale, bias
    )
    assert torch.allclose(got.double(), ref, atol=1e-5)
    for a, b in zip(got_grads, ref_grads):
        assert torch.allclose(a.double(), b, atol=1e-5)


def test_fp32_within_1e5_of_the_fp64_reference():
    image, text, scale, bias = _inputs(64, 32, dtype=torch.float32)
    for stream, ref, args in [
        (streaming_infonce_loss, infonce_loss, (image, text, scale)),
        (streaming_sigmoid_loss, sigmoid_loss, (image, text, scale, bias)),
    ]:
        ref_args = [a.detach().double().requires_grad_() for a in args]
        want, want_grads = _value_and_grads(ref, *ref_args)
        got, got_grads = _value_and_grads(lambda *a, fn=stream: fn(*a, tile=16), *args)
        assert abs(got.double() - want) < 1e-5 * max(1.0, abs(float(want)))
        for a, b in zip(got_grads, want_grads):
            assert torch.allclose(a.double(), b, atol=1e-5)


def test_bf16_inputs_stay_close():
    image, text, scale, _ = _inputs(64, 32, dtype=torch.float32)
    want = infonce_loss(image, text, scale)
    got = streaming_infonce_loss(image.bfloat16(), text.bfloat16(), scale.bfloat16(), tile=16)
    assert abs(float(got.detach()) - float(want.detach())) < 0.05 * float(
        want.detach()
    )  # bf16 has ~3 significant digits


def test_registered_modules_and_tile_validation():
    image, text, scale, bias = _inputs(9, 8)

    class Out:
        image_features, text_features, logit_scale, logit_bias = image, text, scale, bias

    assert torch.allclose(create_loss("infonce-streaming", tile=4)(Out), infonce_loss(image, text, scale))
    assert torch.allclose(create_loss("siglip-streaming", tile=2)(Out), sigmoid_loss(image, text, scale, bias))
    with pytest.raises(ConfigError, match="tile"):
        create_loss("infonce-streaming", tile=0)

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lipkit.errors import ConfigError
from lipkit.losses import create_loss, infonce_loss, sigmoid_loss, streaming_infonce_loss, streaming_sigmoid_loss

FP64_TOL = 1e-10  # float64 streaming against the plain loss: the tolerance of the plain losses' own tests


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
    torch.testing.assert_close(got, ref, atol=FP64_TOL, rtol=FP64_TOL)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=FP64_TOL, rtol=FP64_TOL)


@pytest.mark.parametrize(("n", "tile"), [(1, 4), (7, 3), (16, 4), (33, 8)])
def test_streaming_sigmoid_equals_reference(n, tile):
    image, text, scale, bias = _inputs(n, 12)
    ref, ref_grads = _value_and_grads(sigmoid_loss, image, text, scale, bias)
    got, got_grads = _value_and_grads(
        lambda i, t, s, b: streaming_sigmoid_loss(i, t, s, b, tile), image, text, scale, bias
    )
    torch.testing.assert_close(got, ref, atol=FP64_TOL, rtol=FP64_TOL)
    for a, b in zip(got_grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, atol=FP64_TOL, rtol=FP64_TOL)


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

    torch.testing.assert_close(
        create_loss("infonce-streaming", tile=4)(Out), infonce_loss(image, text, scale), atol=FP64_TOL, rtol=FP64_TOL
    )
    torch.testing.assert_close(
        create_loss("siglip-streaming", tile=2)(Out),
        sigmoid_loss(image, text, scale, bias),
        atol=FP64_TOL,
        rtol=FP64_TOL,
    )
    with pytest.raises(ConfigError, match="tile"):
        create_loss("infonce-streaming", tile=0)


def test_streaming_local_share_equals_the_plain_share_in_fp32():
    """One rank's share (rows 6..11 of 16) with gathered features: value and gradients within 1e-5."""
    from lipkit.losses.distributed import local_infonce_loss
    from lipkit.losses.streaming import streaming_local_infonce_loss

    g = torch.Generator().manual_seed(3)
    leaves = [F.normalize(torch.randn(16, 8, generator=g), dim=-1).requires_grad_() for _ in range(2)]
    scale = torch.tensor(20.0, requires_grad=True)

    def run(fn, *extra):
        for t in (*leaves, scale):
            t.grad = None
        all_image, all_text = leaves
        loss = fn(all_image[6:12], all_text[6:12], all_image, all_text, scale, 6, *extra)
        loss.backward()
        return [loss.detach(), *(t.grad.clone() for t in (*leaves, scale))]

    want, got = run(local_infonce_loss), run(streaming_local_infonce_loss, 5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("form", "reference"), [("siglip-ring", "siglip"), ("infonce-streaming-distributed", "infonce")]
)
def test_distributed_streaming_forms_equal_their_loss_in_one_process(form, reference):
    image, text = (F.normalize(torch.randn(10, 4, dtype=torch.float64), dim=-1) for _ in range(2))
    out = SimpleNamespace(
        image_features=image, text_features=text, logit_scale=torch.tensor(5.0, dtype=torch.float64),
        logit_bias=torch.tensor(-3.0, dtype=torch.float64),
    )  # fmt: skip
    torch.testing.assert_close(
        create_loss(form, tile=3)(out), create_loss(reference)(out), atol=FP64_TOL, rtol=FP64_TOL
    )

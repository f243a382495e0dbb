"""Tests for lipkit.losses: InfoNCE and SigLIP losses against plainly written reference formulas."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lipkit.errors import ConfigError, LipkitError, UnknownNameError
from lipkit.losses import LOSSES, InfoNCELoss, SigmoidLoss, create_loss, infonce_loss, sigmoid_loss

DTYPE = torch.float64


def _features(batch: int, dim: int, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(batch, dim, generator=gen, dtype=DTYPE), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(batch, dim, generator=gen, dtype=DTYPE), dim=-1)
    return image, text


def _leaves(*tensors: Tensor) -> list[Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _reference_infonce(image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
    """Cross-entropy written out pair by pair: rows are image->text, columns text->image."""
    batch = image.shape[0]
    total = image.new_zeros(())
    for i in range(batch):
        row = torch.stack([scale * torch.dot(image[i], text[j]) for j in range(batch)])
        col = torch.stack([scale * torch.dot(image[j], text[i]) for j in range(batch)])
        total = total - (row[i] - torch.logsumexp(row, 0)) - (col[i] - torch.logsumexp(col, 0))
    return total / (2 * batch)


def _reference_sigmoid(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor) -> Tensor:
    """Binary logistic loss summed over every pair, label +1 on the diagonal, divided by the batch size."""
    batch = image.shape[0]
    total = image.new_zeros(())
    for i in range(batch):
        for j in range(batch):
            label = 1.0 if i == j else -1.0
            logit = scale * torch.dot(image[i], text[j]) + bias
            total = total + torch.log1p(torch.exp(-label * logit))
    return total / batch


@pytest.mark.parametrize(("batch", "dim", "scale"), [(1, 4, 3.0), (5, 8, 10.0), (16, 32, 100.0)])
def test_infonce_value_and_grads_match_reference(batch: int, dim: int, scale: float) -> None:
    inputs = _leaves(*_features(batch, dim, seed=batch), torch.tensor(scale, dtype=DTYPE))
    loss = infonce_loss(*inputs)
    ref_inputs = _leaves(*inputs)
    ref = _reference_infonce(*ref_inputs)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_infonce_equals_full_matrix_cross_entropy() -> None:
    image, text = _features(7, 16, seed=1)
    logits = 20.0 * image @ text.T  # (B, B)
    labels = torch.arange(7)
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    torch.testing.assert_close(infonce_loss(image, text, torch.tensor(20.0, dtype=DTYPE)), want)


@pytest.mark.parametrize(
    ("batch", "dim", "scale", "bias"), [(1, 4, 3.0, -1.0), (5, 8, 10.0, -10.0), (16, 32, 30.0, 2.0)]
)
def test_sigmoid_value_and_grads_match_reference(batch: int, dim: int, scale: float, bias: float) -> None:
    scalars = torch.tensor(scale, dtype=DTYPE), torch.tensor(bias, dtype=DTYPE)
    inputs = _leaves(*_features(batch, dim, seed=batch), *scalars)
    loss = sigmoid_loss(*inputs)
    ref_inputs = _leaves(*inputs)
    ref = _reference_sigmoid(*ref_inputs)
    torch.testing.assert_close(loss, ref, atol=1e-12, rtol=1e-12)
    grads = torch.autograd.grad(loss, inputs)
    ref_grads = torch.autograd.grad(ref, ref_inputs)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-10)


def test_gradcheck() -> None:
    image, text = _leaves(*_features(4, 6, seed=3))
    scale, bias = _leaves(torch.tensor(5.0, dtype=DTYPE), torch.tensor(-2.0, dtype=DTYPE))
    assert torch.autograd.gradcheck(infonce_loss, (image, text, scale))
    assert torch.autograd.gradcheck(sigmoid_loss, (image, text, scale, bias))


def test_hand_computed_values() -> None:
    eye = torch.eye(2, dtype=DTYPE)
    # logits [[1, 0], [0, 1]]: each row and column gives -log(e / (e + 1)) = log(1 + 1/e)
    torch.testing.assert_close(
        infonce_loss(eye, eye, torch.tensor(1.0, dtype=DTYPE)), torch.tensor(0.31326168751822286, dtype=DTYPE)
    )
    # logits 2 * eye - 1 = [[1, -1], [-1, 1]] all agree with their labels: 4 * log(1 + 1/e) / 2
    got = sigmoid_loss(eye, eye, torch.tensor(2.0, dtype=DTYPE), torch.tensor(-1.0, dtype=DTYPE))
    torch.testing.assert_close(got, torch.tensor(2 * math.log1p(math.exp(-1)), dtype=DTYPE))
    # scale 1, bias 0: diagonal log(1 + 1/e), off-diagonal logit 0 -> log 2 each; total / 2
    got = sigmoid_loss(eye, eye, torch.tensor(1.0, dtype=DTYPE), torch.tensor(0.0, dtype=DTYPE))
    torch.testing.assert_close(got, torch.tensor(math.log1p(math.exp(-1)) + math.log(2), dtype=DTYPE))


def test_aligned_features_with_large_scale_give_near_zero_loss() -> None:
    basis = torch.eye(8, 16, dtype=DTYPE)  # (B, D) orthonormal rows, image == text
    assert infonce_loss(basis, basis, torch.tensor(100.0, dtype=DTYPE)).item() < 1e-30
    assert sigmoid_loss(basis, basis, torch.tensor(100.0, dtype=DTYPE), torch.tensor(-50.0, dtype=DTYPE)).item() < 1e-15


@pytest.mark.parametrize("batch", [2, 8, 33])
def test_infonce_at_chance_is_log_batch(batch: int) -> None:
    basis = torch.eye(2 * batch, dtype=DTYPE)
    image, text = basis[:batch], basis[batch:]  # (B, 2B) each, every image orthogonal to every text
    loss = infonce_loss(image, text, torch.tensor(100.0, dtype=DTYPE))
    assert loss.item() == pytest.approx(math.log(batch), rel=1e-14)
    # random unrelated high-dimensional features with a small scale are close to chance
    gen = torch.Generator().manual_seed(batch)
    image, text = (F.normalize(torch.randn(batch, 4096, generator=gen, dtype=DTYPE), dim=-1) for _ in range(2))
    assert infonce_loss(image, text, torch.tensor(1.0, dtype=DTYPE)).item() == pytest.approx(math.log(batch), abs=0.05)


def _output(bias: Tensor | None) -> SimpleNamespace:
    image, text = _leaves(*_features(6, 8, seed=0))
    scale = torch.tensor(10.0, dtype=DTYPE, requires_grad=True)
    return SimpleNamespace(image_features=image, text_features=text, logit_scale=scale, logit_bias=bias)


def test_modules_wrap_the_functions_and_backpropagate() -> None:
    bias = torch.tensor(-5.0, dtype=DTYPE, requires_grad=True)
    out = _output(bias)
    torch.testing.assert_close(InfoNCELoss()(out), infonce_loss(out.image_features, out.text_features, out.logit_scale))
    leaves = (out.image_features, out.text_features, out.logit_scale, bias)
    loss = SigmoidLoss()(out)
    torch.testing.assert_close(loss, sigmoid_loss(*leaves))
    got, want = torch.autograd.grad(loss, leaves), torch.autograd.grad(sigmoid_loss(*leaves), leaves)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert list(InfoNCELoss().parameters()) == [] and list(SigmoidLoss().parameters()) == []


def test_infonce_ignores_missing_bias_and_sigmoid_rejects_it() -> None:
    out = _output(None)
    torch.testing.assert_close(InfoNCELoss()(out), infonce_loss(out.image_features, out.text_features, out.logit_scale))
    with pytest.raises(LipkitError, match="logit_bias=None"):
        SigmoidLoss()(out)


def test_mismatched_features_raise() -> None:
    image, text = _features(4, 8, seed=0)
    with pytest.raises(LipkitError, match="same shape"):
        infonce_loss(image, text[:3], torch.tensor(1.0))
    with pytest.raises(LipkitError, match="same shape"):
        sigmoid_loss(image[0], text[0], torch.tensor(1.0), torch.tensor(0.0))


def test_registry() -> None:
    assert {"infonce", "siglip"} <= set(LOSSES.names())
    assert isinstance(create_loss("infonce"), InfoNCELoss)
    assert isinstance(create_loss("siglip"), SigmoidLoss)
    with pytest.raises(UnknownNameError, match="siglip"):
        create_loss("sigslip")
    with pytest.raises(ConfigError, match="infonce"):
        create_loss("infonce", temperature=0.07)


def test_losses_declare_their_bias_and_distributed_form() -> None:
    """Each loss states whether it reads a logit bias and which registered loss runs it over all ranks."""
    expected = {
        "coca": (False, "coca-distributed"),
        "coca-distributed": (False, "coca-distributed"),
        "infonce": (False, "infonce-distributed"),
        "infonce-distributed": (False, "infonce-distributed"),
        "infonce-streaming": (False, "infonce-streaming-distributed"),
        "infonce-streaming-distributed": (False, "infonce-streaming-distributed"),
        "siglip": (True, "siglip-distributed"),
        "siglip-distributed": (True, "siglip-distributed"),
        "siglip-streaming": (True, "siglip-ring"),
        "siglip-ring": (True, "siglip-ring"),
    }
    declared = {name: (LOSSES.get(name).needs_bias, LOSSES.get(name).distributed_form) for name in LOSSES}
    assert declared == expected

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch

import lipkit
from lipkit.losses import create_loss
from lipkit.train import loop
from lipkit.train.accumulate import cached_accumulation_backward
from lipkit.train.config import resolve_config
from lipkit.train.metrics import read_metrics


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("loss_name", "model_name", "patch_dropout"),
    [
        ("infonce", "micro", 0.0),
        ("infonce", "micro", 0.5),
        ("siglip", "tiny-siglip", 0.0),
    ],
)
def test_feature_cache_accumulation_gives_big_batch_gradients(loss_name, model_name, patch_dropout):
    torch.manual_seed(0)
    model = lipkit.create_model(model_name, vision={"patch_dropout": patch_dropout}).train()
    size = model.visual.cfg.image_size
    images = torch.randn(12, 3, size, size)
    tokens = lipkit.get_tokenizer(model_name)([f"caption number {i}" for i in range(12)])
    loss_fn = create_loss(loss_name)

    torch.manual_seed(1)
    big = loss_fn(model(images, tokens))
    big.backward()
    want = _grads(model)
    model.zero_grad(set_to_none=True)

    torch.manual_seed(1)
    got_loss = cached_accumulation_backward(model, loss_fn, images, tokens, micro_batch=5, autocast=nullcontext)
    got = _grads(model)
    assert torch.allclose(got_loss, big.detach(), atol=1e-6)
    assert want.keys() == got.keys()
    for name in want:
        assert torch.allclose(got[name], want[name], atol=1e-5, rtol=1e-4), name


def test_training_with_micro_batches_matches_full_batches(run_overrides):
    base = [*run_overrides, "steps=3", "log_every=1"]
    full = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=full"]))
    micro = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=micro", "accum_micro_batch=4"]))
    for a, b in zip(read_metrics(full.run_dir), read_metrics(micro.run_dir)):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_micro_batched_steps_move_one_micro_batch_at_a_time(run_overrides, monkeypatch):
    """The full batch stays where the loader made it; only micro-batches go to the device, in both passes."""
    moved = []
    real = loop.to_device

    def counting(batch, device, cfg):
        if isinstance(batch, torch.Tensor) and batch.ndim == 4:
            moved.append(batch.shape[0])
        return real(batch, device, cfg)

    monkeypatch.setattr(loop, "to_device", counting)
    cfg = resolve_config("tiny-synthetic", overrides=[*run_overrides, "steps=2", "accum_micro_batch=5"])
    loop.train(cfg)
    batch = cfg.data.batch_size
    per_pass = [5] * (batch // 5) + ([batch % 5] if batch % 5 else [])
    assert moved == per_pass * 2 * 2  # two passes (no-grad, then with gradients) for each of two steps

"""Large contrastive batches in small memory: gradient accumulation with a feature cache.

A contrastive loss couples every sample of the batch, so plain gradient accumulation over
micro-batches changes the loss. Instead (as in GradCache):

1. embed every micro-batch without autograd and cache the features;
2. compute the full-batch loss on the cached features and back-propagate it to them (and to the
   temperature and bias), which gives the gradient of the loss with respect to every feature;
3. embed each micro-batch again with autograd and back-propagate those feature gradients.

The parameter gradients equal the full-batch ones; activation memory is that of one micro-batch. The
random state is replayed per micro-batch, so stochastic layers (patch dropout) draw the same values in
both passes.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
from torch import nn

from lipkit.models import DualEncoder, DualEncoderOutput


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _embed(model: DualEncoder, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(images, normalize=True), model.encode_text(tokens, normalize=True)


def cached_accumulation_backward(
    model: DualEncoder,
    loss_fn: nn.Module,
    images: torch.Tensor,
    tokens: torch.Tensor,
    micro_batch: int,
    autocast: Callable[[], AbstractContextManager],
) -> torch.Tensor:
    """Back-propagate the full-batch loss micro-batch by micro-batch; returns the (detached) loss.

    Args:
        model: The dual encoder (in training mode).
        loss_fn: A loss module taking a :class:`DualEncoderOutput`.
        images: The full batch of images (B, 3, H, W).
        tokens: The full batch of tokens (B, T).
        micro_batch: Samples per forward pass.
        autocast: Factory of the precision context (e.g. bf16 autocast) for every forward pass.
    """
    chunks = list(zip(images.split(micro_batch), tokens.split(micro_batch)))
    states, cached_img, cached_txt = [], [], []
    with torch.no_grad():
        for img, tok in chunks:
            states.append(_rng_state(img.device))
            with autocast():
                f_img, f_txt = _embed(model, img, tok)
            cached_img.append(f_img)
            cached_txt.append(f_txt)
    feats_img = torch.cat(cached_img).requires_grad_()
    feats_txt = torch.cat(cached_txt).requires_grad_()
    with autocast():
        loss = loss_fn(DualEncoderOutput(feats_img, feats_txt, model.scale(), model.logit_bias))
    loss.backward()
    after = _rng_state(images.device)
    for (img, tok), state, g_img, g_txt in zip(
        chunks, states, feats_img.grad.split(micro_batch), feats_txt.grad.split(micro_batch)
    ):
        _set_rng_state(state, img.device)
        with autocast():
            f_img, f_txt = _embed(model, img, tok)
        torch.autograd.backward([f_img, f_txt], [g_img.to(f_img.dtype), g_txt.to(f_txt.dtype)])
    _set_rng_state(after, images.device)
    return loss.detach()

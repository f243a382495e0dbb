"""Large contrastive batches in small memory: gradient accumulation with a feature cache.

A contrastive loss couples every sample of the batch, so plain gradient accumulation over
micro-batches changes the loss. Instead (as in GradCache):

1. embed every micro-batch without autograd and cache the features;
2. compute the full-batch loss on the cached features and back-propagate it to them (and to the
   temperature and bias), which gives the gradient of the loss with respect to every feature;
3. embed each micro-batch again with autograd and back-propagate those feature gradients (with the
   last micro-batch, also the temperature and bias gradients).

The parameter gradients equal the full-batch ones; activation memory is that of one micro-batch. The
random state is replayed per micro-batch, so stochastic layers (patch dropout) draw the same values in
both passes.

Across processes each rank runs this on its share of the global batch with the distributed loss, so
the gradients are those of the global batch once DDP or FSDP has averaged them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from lipkit.models import DualEncoderOutput
from lipkit.models.text_inputs import Tokens


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def cached_accumulation_backward(
    net: nn.Module,
    loss_fn: nn.Module,
    images: torch.Tensor,
    tokens: Tokens,
    micro_batch: int,
    autocast: Callable[[], AbstractContextManager],
    no_sync: Callable[[], AbstractContextManager] = nullcontext,
    place: Callable[[torch.Tensor, Tokens], tuple[torch.Tensor, Tokens]] | None = None,
) -> torch.Tensor:
    """Back-propagate the full-batch loss micro-batch by micro-batch; returns the (detached) loss.

    Across processes, ``images`` and ``tokens`` are this rank's share of the global batch and
    ``loss_fn`` the distributed loss, which gathers the cached features of every rank, so step 2 gives
    each rank the gradients of the global loss with respect to its own features. The gradients of the
    temperature and bias are passed back through the last micro-batch, so every parameter receives its
    gradient in the one backward pass that DDP reduces.

    Args:
        net: The dual encoder in training mode, or what wraps it (DDP, FSDP): called on a micro-batch,
            it returns a :class:`DualEncoderOutput`. Every forward pass goes through it, so its hooks
            (parameter gathering, gradient reduction) see them.
        loss_fn: A loss module taking a :class:`DualEncoderOutput`.
        images: The full batch of images (B, 3, H, W).
        tokens: The full batch of tokens, as the model's tokenizer returns them (B rows).
        micro_batch: Samples per forward pass.
        autocast: Factory of the precision context (e.g. bf16 autocast) for every forward pass.
        no_sync: Factory of a context that keeps gradients local (DDP's ``no_sync``); every micro-batch
            but the last runs in it, so gradients are reduced once per batch.
        place: Moves one micro-batch (images, tokens) to the model's device, in both passes, so the
            full batch can stay in host memory (pinned): only one micro-batch of images is ever on the
            accelerator. ``None`` when the batch is already there.
    """
    place = place or (lambda img, tok: (img, tok))
    chunks = list(zip(images.split(micro_batch), tokens.split(micro_batch)))
    states, cached_img, cached_txt = [], [], []
    with torch.no_grad():
        for host_img, host_tok in chunks:
            img, tok = place(host_img, host_tok)
            states.append(_rng_state(img.device))
            with autocast():
                out = net(img, tok)
            cached_img.append(out.image_features)
            cached_txt.append(out.text_features)
    feats_img = torch.cat(cached_img).requires_grad_()
    feats_txt = torch.cat(cached_txt).requires_grad_()
    scale = out.logit_scale.detach().requires_grad_()
    bias = None if out.logit_bias is None else out.logit_bias.detach().requires_grad_()
    with autocast():
        loss = loss_fn(DualEncoderOutput(feats_img, feats_txt, scale, bias))
    loss.backward()
    device = feats_img.device
    after = _rng_state(device)
    last = len(chunks) - 1
    for i, ((host_img, host_tok), state, g_img, g_txt) in enumerate(
        zip(chunks, states, feats_img.grad.split(micro_batch), feats_txt.grad.split(micro_batch))
    ):
        img, tok = place(host_img, host_tok)
        _set_rng_state(state, device)
        with no_sync() if i < last else nullcontext():
            with autocast():
                out = net(img, tok)
            outputs = [out.image_features, out.text_features]
            grads = [g_img.to(out.image_features.dtype), g_txt.to(out.text_features.dtype)]
            if i == last:
                for output, leaf in ((out.logit_scale, scale), (out.logit_bias, bias)):
                    if leaf is not None and leaf.grad is not None and output.requires_grad:
                        outputs.append(output)
                        grads.append(leaf.grad.to(output.dtype))
            torch.autograd.backward(outputs, grads)
    _set_rng_state(after, device)
    return loss.detach()

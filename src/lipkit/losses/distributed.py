"""Contrastive losses across processes: each rank embeds its share of the global batch.

Every rank gathers the other ranks' features (with gradients flowing back through the gather) and
computes only its own rows: its images against all texts and its texts against all images. No rank
holds the global B x B logit matrix; each holds (B / world) x B. The rank losses add up to the
single-process loss; each is multiplied by the world size so that DDP's gradient averaging yields
exactly the single-process gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lipkit.losses.contrastive import check_pair
from lipkit.losses.registry import LOSSES, Loss, LossInputs
from lipkit.losses.sigmoid import SigmoidLoss
from lipkit.losses.streaming import check_tile, sigmoid_block_loss, streaming_local_infonce_loss
from lipkit.utils import rank_and_world


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)  # (world * B, D)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # every rank's loss depends on every rank's features: sum their gradients
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: Tensor) -> Tensor:
    """Concatenate ``x`` (B, D) from every rank into (world * B, D); gradients flow back to each rank."""
    return _GatherWithGrad.apply(x)


def local_infonce_loss(image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, scale: Tensor, offset: int):
    """This rank's share of the global InfoNCE loss (shares sum to the global loss).

    Args:
        image: This rank's image features (b, D); rows ``offset .. offset + b`` of ``all_image``.
        text: This rank's text features (b, D).
        all_image: Every rank's image features (B, D).
        all_text: Every rank's text features (B, D).
        scale: The exponentiated temperature.
        offset: Global index of this rank's first sample.
    """
    labels = torch.arange(offset, offset + image.shape[0], device=image.device)
    i2t = F.cross_entropy(scale * image @ all_text.T, labels, reduction="sum")  # (b, B) logits
    t2i = F.cross_entropy(scale * text @ all_image.T, labels, reduction="sum")  # (b, B) logits
    return (i2t + t2i) / (2 * all_image.shape[0])


def local_sigmoid_loss(image: Tensor, all_text: Tensor, scale: Tensor, bias: Tensor, offset: int) -> Tensor:
    """This rank's share of the global sigmoid loss: its images against every text (shares sum to it)."""
    logits = scale * image @ all_text.T + bias  # (b, B)
    rows = torch.arange(offset, offset + image.shape[0], device=image.device)[:, None]
    cols = torch.arange(all_text.shape[0], device=image.device)[None, :]
    signs = torch.where(rows == cols, 1.0, -1.0).to(logits.dtype)
    return -F.logsigmoid(signs * logits).sum() / all_text.shape[0]


@LOSSES.register("infonce-distributed")
class DistributedInfoNCELoss(Loss):
    """InfoNCE over the global batch of all ranks (equals ``infonce`` in one process)."""

    distributed_form = "infonce-distributed"

    def forward(self, out: LossInputs) -> Tensor:
        """This rank's loss share times the world size (so DDP's mean gives global gradients)."""
        check_pair(out.image_features, out.text_features)
        rank, size = rank_and_world()
        if size == 1:
            all_image, all_text = out.image_features, out.text_features
        else:
            all_image, all_text = gather_with_grad(out.image_features), gather_with_grad(out.text_features)
        offset = rank * out.image_features.shape[0]
        share = local_infonce_loss(out.image_features, out.text_features, all_image, all_text, out.logit_scale, offset)
        return share * size


@LOSSES.register("siglip-distributed")
class DistributedSigmoidLoss(SigmoidLoss):
    """The sigmoid loss over the global batch of all ranks (equals ``siglip`` in one process)."""

    def forward(self, out: LossInputs) -> Tensor:
        """This rank's loss share times the world size (so DDP's mean gives global gradients)."""
        check_pair(out.image_features, out.text_features)
        bias = self.require_bias(out)
        rank, size = rank_and_world()
        all_text = out.text_features if size == 1 else gather_with_grad(out.text_features)
        offset = rank * out.image_features.shape[0]
        return local_sigmoid_loss(out.image_features, all_text, out.logit_scale, bias, offset) * size


@LOSSES.register("infonce-streaming-distributed")
class DistributedStreamingInfoNCELoss(Loss):
    """InfoNCE over the global batch, each rank's share computed tile by tile (O(tile^2) loss memory)."""

    distributed_form = "infonce-streaming-distributed"

    def __init__(self, tile: int = 4096) -> None:
        super().__init__()
        self.tile = check_tile(tile)

    def forward(self, out: LossInputs) -> Tensor:
        """This rank's loss share times the world size (so DDP's mean gives global gradients)."""
        check_pair(out.image_features, out.text_features)
        rank, size = rank_and_world()
        image, text = out.image_features, out.text_features
        all_image, all_text = (image, text) if size == 1 else (gather_with_grad(image), gather_with_grad(text))
        offset = rank * image.shape[0]
        share = streaming_local_infonce_loss(image, text, all_image, all_text, out.logit_scale, offset, self.tile)
        return share * size


class _NeighbourExchange(torch.autograd.Function):
    """Send ``x`` to the next rank and return the previous rank's; gradients travel the other way."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, size = rank_and_world()
        return _exchange(x, to=(rank + 1) % size, source=(rank - 1) % size)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        rank, size = rank_and_world()
        return _exchange(grad, to=(rank - 1) % size, source=(rank + 1) % size)


def _exchange(x: Tensor, to: int, source: int) -> Tensor:
    received = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), to), dist.P2POp(dist.irecv, received, source)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def neighbour_exchange(x: Tensor) -> Tensor:
    """The previous rank's ``x`` (ring order), passing this rank's on to the next; differentiable."""
    return _NeighbourExchange.apply(x)


@LOSSES.register("siglip-ring")
class RingSigmoidLoss(SigmoidLoss):
    """The sigmoid loss over the global batch by SigLIP's chunked exchange: texts travel round the ring.

    Each rank scores its images against its own texts, then ``world - 1`` times passes the block of
    texts it holds to the next rank and receives the previous rank's, scoring each block as it comes
    (all negatives). Communication is with the two ring neighbours only, and no rank holds logits
    beyond one tile: each block is scored tile by tile and recomputed in the backward pass (the text
    blocks received are kept for it, B x D features in all, as an all-gather would keep). Equals
    ``siglip`` in one process.
    """

    distributed_form = "siglip-ring"

    def __init__(self, tile: int = 4096) -> None:
        super().__init__()
        self.tile = check_tile(tile)

    def forward(self, out: LossInputs) -> Tensor:
        """This rank's loss share times the world size (so DDP's mean gives global gradients)."""
        check_pair(out.image_features, out.text_features)
        bias = self.require_bias(out)
        _, size = rank_and_world()
        image, text = out.image_features, out.text_features
        total = sigmoid_block_loss(image, text, out.logit_scale, bias, True, self.tile)
        for _ in range(size - 1):
            text = neighbour_exchange(text)
            total = total + sigmoid_block_loss(image, text, out.logit_scale, bias, False, self.tile)
        return total / image.shape[0]  # (share = total / (b * size)) * size

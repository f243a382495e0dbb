"""Streaming (tiled) contrastive losses: memory O(B x tile) instead of O(B^2).

The B x B logit matrix is never held. The forward pass visits it tile by tile, keeping running
log-sum-exps per row and per column (the online softmax of FlashAttention and Inf-CL); the backward
pass recomputes each tile from the saved features and those statistics. Values and gradients equal
:func:`lipkit.losses.infonce_loss` and :func:`lipkit.losses.sigmoid_loss`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from lipkit.errors import ConfigError
from lipkit.losses.contrastive import check_pair
from lipkit.losses.registry import LOSSES, Loss, LossInputs
from lipkit.losses.sigmoid import SigmoidLoss

__all__ = [
    "StreamingInfoNCELoss",
    "StreamingSigmoidLoss",
    "sigmoid_block_loss",
    "streaming_infonce_loss",
    "streaming_local_infonce_loss",
    "streaming_sigmoid_loss",
]


def _tiles(n: int, tile: int) -> Iterator[slice]:
    for start in range(0, n, tile):
        yield slice(start, min(start + tile, n))


def _acc(x: Tensor) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _logsumexps(image: Tensor, text: Tensor, scale: Tensor, tile: int) -> tuple[Tensor, Tensor]:
    """Row and column log-sum-exp of ``scale * image @ text.T``, tile by tile, accumulated in float32+."""
    n, acc = image.shape[0], _acc(image)
    row = torch.full((n,), -torch.inf, device=image.device, dtype=acc)
    col = torch.full((n,), -torch.inf, device=image.device, dtype=acc)
    for rs in _tiles(n, tile):
        for cs in _tiles(n, tile):
            logits = (scale * image[rs] @ text[cs].T).to(acc)  # (tile, tile)
            row[rs] = torch.logaddexp(row[rs], torch.logsumexp(logits, dim=1))
            col[cs] = torch.logaddexp(col[cs], torch.logsumexp(logits, dim=0))
    return row, col


class _StreamingInfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, tile: int) -> Tensor:
        row, col = _logsumexps(image, text, scale, tile)
        positives = (scale * (image * text).sum(dim=1)).to(row.dtype)  # (B,)
        ctx.save_for_backward(image, text, scale, row, col)
        ctx.tile = tile
        return ((row - positives).mean() + (col - positives).mean()) / 2

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        image, text, scale, row, col = ctx.saved_tensors
        n, coef, acc = image.shape[0], grad / (2 * image.shape[0]), row.dtype
        g_image = torch.zeros_like(image, dtype=acc)
        g_text = torch.zeros_like(text, dtype=acc)
        g_scale = torch.zeros((), device=image.device, dtype=acc)
        for rs in _tiles(n, ctx.tile):
            for cs in _tiles(n, ctx.tile):
                dots = (image[rs] @ text[cs].T).to(acc)  # (tile, tile)
                logits = scale * dots
                weights = torch.exp(logits - row[rs, None]) + torch.exp(logits - col[None, cs])  # p + q
                g_image[rs] += weights @ text[cs].to(acc)
                g_text[cs] += weights.T @ image[rs].to(acc)
                g_scale += (weights * dots).sum()
        diag = (image * text).sum(dim=1).to(acc)
        g_image = coef * scale * (g_image - 2 * text.to(acc))
        g_text = coef * scale * (g_text - 2 * image.to(acc))
        g_scale = coef * (g_scale - 2 * diag.sum())
        return g_image.to(image.dtype), g_text.to(text.dtype), g_scale.to(scale.dtype), None


def streaming_infonce_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, tile: int = 4096
) -> Tensor:
    """:func:`~lipkit.losses.infonce_loss`, computed tile by tile (same value and gradients).

    Args:
        image_features: L2-normalised image embeddings (B, D).
        text_features: L2-normalised text embeddings (B, D).
        logit_scale: The exponentiated temperature (scalar tensor).
        tile: Rows and columns per tile; memory is O(B x tile).
    """
    check_pair(image_features, text_features)
    return _StreamingInfoNCE.apply(image_features, text_features, logit_scale, tile)


class _StreamingSigmoid(torch.autograd.Function):
    """The summed pairwise sigmoid loss of one block of pairs, tile by tile (divided by the caller).

    ``diagonal``: the block's positives are its diagonal (image i with text i); otherwise every pair is
    a negative (a block of another rank's texts, in the ring exchange).
    """

    @staticmethod
    def forward(ctx, image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, tile: int, diagonal: bool) -> Tensor:
        total = torch.zeros((), device=image.device, dtype=_acc(image))
        for rs in _tiles(image.shape[0], tile):
            for cs in _tiles(text.shape[0], tile):
                signs = _signs(rs, cs, image, diagonal)
                total += -F.logsigmoid(signs * _sig_logits(image, text, scale, bias, rs, cs)).sum()
        ctx.save_for_backward(image, text, scale, bias)
        ctx.tile, ctx.diagonal = tile, diagonal
        return total

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        image, text, scale, bias = ctx.saved_tensors
        acc = _acc(image)
        g_image = torch.zeros_like(image, dtype=acc)
        g_text = torch.zeros_like(text, dtype=acc)
        g_scale = torch.zeros((), device=image.device, dtype=acc)
        g_bias = torch.zeros((), device=image.device, dtype=acc)
        for rs in _tiles(image.shape[0], ctx.tile):
            for cs in _tiles(text.shape[0], ctx.tile):
                signs = _signs(rs, cs, image, ctx.diagonal).to(acc)
                dots = (image[rs] @ text[cs].T).to(acc)  # (tile, tile)
                d_logits = -signs * torch.sigmoid(-signs * (scale * dots + bias))  # d loss / d logit
                g_image[rs] += scale * d_logits @ text[cs].to(acc)
                g_text[cs] += scale * d_logits.T @ image[rs].to(acc)
                g_scale += (d_logits * dots).sum()
                g_bias += d_logits.sum()
        return (
            (grad * g_image).to(image.dtype),
            (grad * g_text).to(text.dtype),
            (grad * g_scale).to(scale.dtype),
            (grad * g_bias).to(bias.dtype),
            None,
            None,
        )


def _signs(rs: slice, cs: slice, like: Tensor, diagonal: bool = True) -> Tensor:
    """+1 where the row index equals the column index (if ``diagonal``), -1 elsewhere: (rows, cols)."""
    if not diagonal:
        return torch.full((rs.stop - rs.start, cs.stop - cs.start), -1.0, device=like.device)
    rows = torch.arange(rs.start, rs.stop, device=like.device)[:, None]
    cols = torch.arange(cs.start, cs.stop, device=like.device)[None, :]
    return torch.where(rows == cols, 1.0, -1.0)


def _sig_logits(image: Tensor, text: Tensor, scale: Tensor, bias: Tensor, rs: slice, cs: slice) -> Tensor:
    return (scale * image[rs] @ text[cs].T + bias).to(_acc(image))


def streaming_sigmoid_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor, tile: int = 4096
) -> Tensor:
    """:func:`~lipkit.losses.sigmoid_loss`, computed tile by tile (same value and gradients).

    Args:
        image_features: L2-normalised image embeddings (B, D).
        text_features: L2-normalised text embeddings (B, D).
        logit_scale: The exponentiated temperature (scalar tensor).
        logit_bias: The logit bias (scalar tensor).
        tile: Rows and columns per tile; memory is O(B x tile).
    """
    check_pair(image_features, text_features)
    total = _StreamingSigmoid.apply(image_features, text_features, logit_scale, logit_bias, tile, True)
    return total / image_features.shape[0]


def sigmoid_block_loss(
    image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor, diagonal: bool, tile: int
) -> Tensor:
    """The summed sigmoid loss of images (b, D) against a block of texts (b', D), tile by tile.

    ``diagonal``: image i and text i are the positive pairs; otherwise all pairs are negatives. Holds
    no logits between the forward and backward passes (they are recomputed).
    """
    return _StreamingSigmoid.apply(image_features, text_features, logit_scale, logit_bias, tile, diagonal)


class _StreamingRowCE(torch.autograd.Function):
    """``sum_i [logsumexp_j(s q_i . k_j) - s q_i . k_(offset + i)]``, tile by tile: one direction of InfoNCE."""

    @staticmethod
    def forward(ctx, queries: Tensor, keys: Tensor, scale: Tensor, offset: int, tile: int) -> Tensor:
        b, acc = queries.shape[0], _acc(queries)
        lse = torch.full((b,), -torch.inf, device=queries.device, dtype=acc)
        for rs in _tiles(b, tile):
            for cs in _tiles(keys.shape[0], tile):
                logits = (scale * queries[rs] @ keys[cs].T).to(acc)
                lse[rs] = torch.logaddexp(lse[rs], torch.logsumexp(logits, dim=1))
        positives = (scale * (queries * keys[offset : offset + b]).sum(dim=1)).to(acc)
        ctx.save_for_backward(queries, keys, scale, lse)
        ctx.offset, ctx.tile = offset, tile
        return (lse - positives).sum()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        queries, keys, scale, lse = ctx.saved_tensors
        b, acc, offset = queries.shape[0], lse.dtype, ctx.offset
        g_q = torch.zeros_like(queries, dtype=acc)
        g_k = torch.zeros_like(keys, dtype=acc)
        g_scale = torch.zeros((), device=queries.device, dtype=acc)
        for rs in _tiles(b, ctx.tile):
            for cs in _tiles(keys.shape[0], ctx.tile):
                dots = (queries[rs] @ keys[cs].T).to(acc)
                probs = torch.exp(scale * dots - lse[rs, None])  # the softmax over keys, this tile of it
                g_q[rs] += probs @ keys[cs].to(acc)
                g_k[cs] += probs.T @ queries[rs].to(acc)
                g_scale += (probs * dots).sum()
        q, own = queries.to(acc), keys[offset : offset + b].to(acc)
        g_q -= own
        g_k[offset : offset + b] -= q
        g_scale -= (q * own).sum()
        coef = grad * scale
        return (coef * g_q).to(queries.dtype), (coef * g_k).to(keys.dtype), (grad * g_scale).to(scale.dtype), None, None


def streaming_local_infonce_loss(
    image: Tensor, text: Tensor, all_image: Tensor, all_text: Tensor, scale: Tensor, offset: int, tile: int = 4096
) -> Tensor:
    """:func:`lipkit.losses.distributed.local_infonce_loss` (same arguments) tile by tile, ``tile`` rows
    and columns at a time: memory O(tile^2), not O(b x B)."""
    i2t = _StreamingRowCE.apply(image, all_text, scale, offset, tile)
    t2i = _StreamingRowCE.apply(text, all_image, scale, offset, tile)
    return (i2t + t2i) / (2 * all_image.shape[0])


def check_tile(tile: int) -> int:
    if tile < 1:
        raise ConfigError(f"loss tile must be positive, got {tile}")
    return tile


@LOSSES.register("infonce-streaming")
class StreamingInfoNCELoss(Loss):
    """InfoNCE with O(B x tile) memory; ``tile`` rows and columns of logits at a time."""

    distributed_form = "infonce-streaming-distributed"

    def __init__(self, tile: int = 4096) -> None:
        super().__init__()
        self.tile = check_tile(tile)

    def forward(self, out: LossInputs) -> Tensor:
        """Compute the loss from a model output."""
        return streaming_infonce_loss(out.image_features, out.text_features, out.logit_scale, self.tile)


@LOSSES.register("siglip-streaming")
class StreamingSigmoidLoss(SigmoidLoss):
    """The SigLIP sigmoid loss with O(B x tile) memory."""

    distributed_form = "siglip-ring"

    def __init__(self, tile: int = 4096) -> None:
        super().__init__()
        self.tile = check_tile(tile)

    def forward(self, out: LossInputs) -> Tensor:
        """Compute the loss from a model output (which must carry a logit bias)."""
        bias = self.require_bias(out)
        return streaming_sigmoid_loss(out.image_features, out.text_features, out.logit_scale, bias, self.tile)

"""CLIP's symmetric InfoNCE (softmax contrastive) loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lipkit.errors import LipkitError
from lipkit.losses.registry import LOSSES, Loss, LossInputs

__all__ = ["InfoNCELoss", "check_pair", "infonce_loss"]


def check_pair(image_features: Tensor, text_features: Tensor) -> None:
    """Raise :class:`LipkitError` unless both feature batches are (B, D) with the same shape."""
    if image_features.ndim != 2 or image_features.shape != text_features.shape:
        raise LipkitError(
            "image and text features must both be (batch, dim) with the same shape, got "
            f"{tuple(image_features.shape)} and {tuple(text_features.shape)}"
        )


def infonce_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric cross-entropy over the image-text similarity matrix (CLIP).

    Row ``i`` of ``image_features`` and row ``i`` of ``text_features`` form the positive pair; every other
    row of the batch is a negative. The loss is the mean of the image->text and text->image cross-entropies.

    Args:
        image_features: L2-normalised image embeddings, shape (B, D).
        text_features: L2-normalised text embeddings, shape (B, D).
        logit_scale: The already exponentiated temperature, a scalar tensor.

    Returns:
        The scalar loss.
    """
    check_pair(image_features, text_features)
    logits = logit_scale * image_features @ text_features.T  # (B, B): image i against text j
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@LOSSES.register("infonce")
class InfoNCELoss(Loss):
    """Stateless module form of :func:`infonce_loss`; ``logit_bias`` of the output is ignored."""

    distributed_form = "infonce-distributed"

    def forward(self, out: LossInputs) -> Tensor:
        """Compute the loss from a model output.

        Args:
            out: Any object with ``image_features``, ``text_features`` and ``logit_scale`` attributes.

        Returns:
            The scalar loss.
        """
        return infonce_loss(out.image_features, out.text_features, out.logit_scale)

"""SigLIP's pairwise sigmoid loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lipkit.errors import LipkitError
from lipkit.losses.contrastive import check_pair
from lipkit.losses.registry import LOSSES, Loss, LossInputs

__all__ = ["SigmoidLoss", "sigmoid_loss"]


def sigmoid_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """Binary logistic loss on every image-text pair of the batch (SigLIP).

    The pair (i, j) is a positive (label +1) when ``i == j`` and a negative (label -1) otherwise. The summed
    negative log-likelihood of all B x B pairs is divided by the batch size B.

    Args:
        image_features: L2-normalised image embeddings, shape (B, D).
        text_features: L2-normalised text embeddings, shape (B, D).
        logit_scale: The already exponentiated temperature, a scalar tensor.
        logit_bias: The learnable bias added to every logit, a scalar tensor.

    Returns:
        The scalar loss.
    """
    check_pair(image_features, text_features)
    logits = logit_scale * image_features @ text_features.T + logit_bias  # (B, B)
    batch = logits.shape[0]
    labels = torch.full_like(logits, -1.0)  # (B, B): -1 off the diagonal ...
    labels.fill_diagonal_(1.0)  # ... and +1 on it, built in place (no eye, no scaled and shifted copies)
    return -F.logsigmoid(labels * logits).sum() / batch


@LOSSES.register("siglip")
class SigmoidLoss(Loss):
    """Stateless module form of :func:`sigmoid_loss`; the model must provide ``logit_bias``."""

    needs_bias = True
    distributed_form = "siglip-distributed"

    def forward(self, out: LossInputs) -> Tensor:
        """Compute the loss from a model output.

        Args:
            out: Any object with ``image_features``, ``text_features``, ``logit_scale`` and ``logit_bias``.

        Returns:
            The scalar loss.

        Raises:
            LipkitError: ``out.logit_bias`` is missing or None (the model was built without a bias).
        """
        return sigmoid_loss(out.image_features, out.text_features, out.logit_scale, self.require_bias(out))

    @staticmethod
    def require_bias(out: LossInputs) -> Tensor:
        """The output's logit bias; a clear error when the model has none."""
        bias = getattr(out, "logit_bias", None)
        if bias is None:
            raise LipkitError(
                "the siglip loss needs a logit bias, but the model output has logit_bias=None; "
                "build the model with a learnable bias (SigLIP init) or use the 'infonce' loss"
            )
        return bias

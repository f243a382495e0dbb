"""CoCa's loss: a contrastive loss on the embeddings plus the captioning loss of the decoder."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from lipkit.errors import ConfigError
from lipkit.losses.registry import LOSSES, Loss, LossInputs

__all__ = ["CoCaLoss", "caption_loss"]


class CaptionInputs(LossInputs, Protocol):
    """What the CoCa loss reads from the model output (:class:`lipkit.models.coca.CoCaOutput`)."""

    logits: Tensor
    labels: Tensor
    pad_id: int


def caption_loss(logits: Tensor, labels: Tensor, pad_id: int) -> Tensor:
    """Mean cross-entropy of next-token predictions over the tokens that are not padding.

    Args:
        logits: Next-token logits (B, T, vocab).
        labels: The tokens they predict (B, T).
        pad_id: Labels equal to it are ignored.
    """
    return F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=pad_id)


@LOSSES.register("coca")
class CoCaLoss(Loss):
    """``contrastive_weight`` x a contrastive loss + ``caption_weight`` x :func:`caption_loss` (CoCa).

    The defaults are OpenCLIP's CoCa recipe (contrastive 1, captioning 2). Only a CoCa model
    (``ModelConfig.decoder``) gives the captioning logits it reads.

    Args:
        caption_weight: Weight of the captioning loss.
        contrastive_weight: Weight of the contrastive loss; 0 skips it.
        contrastive: The registered contrastive loss (``infonce``, ``siglip``...).
        pad_id: Label ignored by the captioning loss; by default the model's padding id.
    """

    distributed_form = "coca-distributed"
    needs_captions = True

    def __init__(
        self,
        caption_weight: float = 2.0,
        contrastive_weight: float = 1.0,
        contrastive: str = "infonce",
        pad_id: int | None = None,
    ) -> None:
        super().__init__()
        if getattr(LOSSES.get(contrastive), "needs_captions", False):
            raise ConfigError(f"CoCa's contrastive loss must be a contrastive loss, not {contrastive!r}")
        self.contrastive = LOSSES.get(self._contrastive_name(contrastive))()
        self.needs_bias = self.contrastive.needs_bias
        self.caption_weight, self.contrastive_weight, self.pad_id = caption_weight, contrastive_weight, pad_id

    def _contrastive_name(self, name: str) -> str:
        return name

    def parts(self, out: CaptionInputs) -> dict[str, Tensor]:
        """The weighted contrastive and captioning losses, by name."""
        pad_id = out.pad_id if self.pad_id is None else self.pad_id
        caption = self.caption_weight * caption_loss(out.logits, out.labels, pad_id)
        contrastive = torch.zeros_like(caption)
        if self.contrastive_weight:
            contrastive = self.contrastive_weight * self.contrastive(out)
        return {"contrastive_loss": contrastive, "caption_loss": caption}

    def forward(self, out: CaptionInputs) -> Tensor:
        """The total loss of a CoCa model's output."""
        return sum(self.parts(out).values())


@LOSSES.register("coca-distributed")
class DistributedCoCaLoss(CoCaLoss):
    """:class:`CoCaLoss` across processes: the contrastive part over the global batch (its distributed
    form), the captioning part over each process's own captions."""

    distributed_form = "coca-distributed"

    def _contrastive_name(self, name: str) -> str:
        form = LOSSES.get(name).distributed_form
        if form is None:
            raise ConfigError(f"contrastive loss {name!r} does not run across processes")
        return form

"""What image towers take besides pixels: batches whose rows are partly points in the trunk's feature space.

A batch of training pairs may mix images with pairs whose image side is already a feature vector of the
frozen image trunk: classifier prototypes (:mod:`lipkit.data.prototypes`). :class:`MixedImages` holds
such a batch; :meth:`lipkit.models.DualEncoder.encode_image` runs the trunk on the image rows only and
takes the given features for the others, then projects every row with the same head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lipkit.errors import LipkitError
from lipkit.models.text_inputs import TensorRecord


@dataclass(frozen=True)
class MixedImages(TensorRecord):
    """A batch of images some of whose rows are given as trunk features instead.

    Attributes:
        pixels: Images (B, 3, H, W); rows where ``from_features`` is set are unused (zeros).
        features: Trunk features (B, F); only the rows where ``from_features`` is set are used.
        from_features: (B,) booleans: which rows are given as features.
    """

    pixels: torch.Tensor
    features: torch.Tensor
    from_features: torch.Tensor

    def __post_init__(self) -> None:
        sizes = {self.pixels.shape[0], self.features.shape[0], self.from_features.shape[0]}
        if len(sizes) != 1:
            raise LipkitError(
                f"mixed image batch: pixels {tuple(self.pixels.shape)}, features {tuple(self.features.shape)} "
                f"and from_features {tuple(self.from_features.shape)} differ in batch size"
            )

    @property
    def shape(self) -> torch.Size:
        """The shape of the pixel batch: (B, 3, H, W)."""
        return self.pixels.shape

    @classmethod
    def from_batch(cls, part: Any) -> Any:
        """A loader's image part as the model takes it: a tensor as it is, the mixed form's dict as this record."""
        return cls(**part) if isinstance(part, dict) else part


def trunk_features(trunk: Any, images: MixedImages) -> torch.Tensor:
    """The trunk's features (B, F) of a mixed batch: computed for image rows, given for the others.

    Args:
        trunk: The tower's ``features`` method (images (N, 3, H, W) -> features (N, F)).
        images: The batch.
    """
    given = images.features
    rows = (~images.from_features.bool()).nonzero().squeeze(1)
    if len(rows) == 0:
        return given
    computed = trunk(images.pixels[rows])
    return given.to(computed.dtype).index_copy(0, rows, computed)

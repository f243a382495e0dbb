"""What text towers take: token ids with their attention mask, and the cached output of a locked text trunk.

A text tower takes what its tokenizer returns. The CLIP text transformer takes a LongTensor of token ids
(B, T): :class:`~lipkit.models.tokenizer.ClipTokenizer` returns one, as OpenCLIP's tokenizer does, so
the two are interchangeable. A Hugging Face tower takes :class:`TextTokens`, the ids with their
attention mask, as :class:`~lipkit.models.hf_tokenizer.HFTokenizer` returns them. Both answer the few
tensor methods that the loaders and the trainer call between the tokenizer and the model (``len``,
row indexing, ``split``, ``to``, ``pin_memory``), so that code never asks which one it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import TypeVar

import torch

from lipkit.errors import LipkitError

R = TypeVar("R", bound="TensorRecord")


class TensorRecord:
    """A dataclass of tensors that share their first (batch) dimension; a field may be ``None``.

    The tensors are moved, pinned, indexed and split together, as one batch.
    """

    def map(self: R, fn: Callable[[torch.Tensor], torch.Tensor]) -> R:
        """A copy with ``fn`` applied to every tensor field."""
        changed = {f.name: fn(value) for f in fields(self) if (value := getattr(self, f.name)) is not None}
        return replace(self, **changed)

    def __len__(self) -> int:
        return getattr(self, fields(self)[0].name).shape[0]

    def __getitem__(self: R, index: int | slice | torch.Tensor) -> R:
        """The rows ``index`` (an int, a slice or an index tensor) of every field."""
        return self.map(lambda t: t[index])

    def split(self: R, size: int) -> tuple[R, ...]:
        """Consecutive chunks of ``size`` rows (the last may be shorter), as ``torch.Tensor.split`` gives."""
        return tuple(self[start : start + size] for start in range(0, len(self), size))

    def to(self: R, device: torch.device | str, non_blocking: bool = False) -> R:
        """Every tensor on ``device``."""
        return self.map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self: R) -> R:
        """Every tensor in page-locked host memory (what a ``DataLoader`` with ``pin_memory=True`` calls)."""
        return self.map(lambda t: t.pin_memory())


def padded_length(used: torch.Tensor, multiple: int = 1) -> int:
    """How many leading positions a batch keeps when it drops the positions unused in every row.

    Args:
        used: Which positions of each row hold text (B, T).
        multiple: The length is rounded up to a multiple of this (at most T).
    """
    columns = used.any(dim=0).nonzero()
    length = int(columns[-1]) + 1 if len(columns) else 1
    return min(used.shape[-1], -(-length // multiple) * multiple)


@dataclass(frozen=True)
class TextTokens(TensorRecord):
    """Token ids with their attention mask: what Hugging Face text towers take.

    Attributes:
        ids: Token ids (B, T).
        mask: Attention mask (B, T): 1 where a text has a token, 0 at padding.
    """

    ids: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.mask.shape:
            raise LipkitError(
                f"token ids {tuple(self.ids.shape)} and attention mask {tuple(self.mask.shape)} differ in shape"
            )

    @property
    def shape(self) -> torch.Size:
        """The shape of the ids (and of the mask): (B, T)."""
        return self.ids.shape

    def trim(self, multiple: int = 1) -> TextTokens:
        """Drop the trailing positions that are padding in every row, keeping a multiple of ``multiple``.

        Exact for the towers that take these tokens: the mask hides padding from every position.
        """
        keep = padded_length(self.mask.bool(), multiple)
        return self.map(lambda t: t[:, :keep].contiguous())


Tokens = torch.Tensor | TextTokens
"""A batch of tokenised text: ids (B, T) for the CLIP text transformer, :class:`TextTokens` for Hugging Face towers."""


@dataclass(frozen=True)
class TextCache(TensorRecord):
    """The output of a locked text trunk, where the trainable top of the text tower starts.

    Feature caching (LiT) computes it once per text; :meth:`lipkit.models.DualEncoder.forward_from_features`
    finishes the tower from it.

    Attributes:
        features: With every text layer locked, the trunk's pooled features (B, F); with
            ``unlock_text_layers``, the token states entering the first unlocked layer (B, T, W).
        tokens: With ``unlock_text_layers``, what those layers and the pooling read besides the states
            (B, T): the token ids (CLIP text transformer) or the attention mask (Hugging Face towers);
            ``None`` with pooled features.
    """

    features: torch.Tensor
    tokens: torch.Tensor | None = None

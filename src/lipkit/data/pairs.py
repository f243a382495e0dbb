"""The base types of image-text pair sources, and the stable train/val/test split.

A source is map-style: for an index it returns a key, a PIL image and a caption; the loader applies
transforms and tokenisation. Sources are opened by name or path with :func:`lipkit.data.spec.open_source`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lipkit.data.decode import open_image

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class Pair:
    """One image-caption pair on disk (a listing may hold ``caption=None``; sources never serve those).

    ``caption_fallback`` tells that the caption was not UTF-8 (see :func:`lipkit.data.decode.decode_text`).
    """

    key: str
    image_path: Path
    caption: str | None
    caption_fallback: bool = False


class PairSource:
    """An indexable set of pairs that loads images lazily.

    Subclasses either fill ``self.pairs`` or override ``__len__``, :meth:`key`, :meth:`caption` and
    :meth:`image`. Sharded sources also override :meth:`groups`, which the loader's shuffle uses to read
    a few shards at a time.
    """

    pairs: list[Pair]

    def __len__(self) -> int:
        return len(self.pairs)

    def key(self, index: int) -> str:
        """A name for pair ``index``, unique within the source."""
        return self.pairs[index].key

    def caption(self, index: int) -> str:
        """The caption of pair ``index``."""
        return self.pairs[index].caption

    def image(self, index: int, draft: tuple[int, int] | None = None) -> Image.Image:
        """The image of pair ``index``, as loaded (mode as stored; transforms convert to RGB).

        Args:
            index: The pair.
            draft: Minimum (width, height) the caller needs; JPEGs may then be decoded at a reduced scale.

        Raises:
            UndecodableImage: The image is missing or corrupt.
        """
        return open_image(self.pairs[index].image_path, draft)

    def groups(self) -> np.ndarray | None:
        """Boundaries ``[0, n1, n1 + n2, ..., len]`` of contiguous storage groups (shards), or ``None``."""
        return None

    def prefetch(self, indexes: Sequence[int]) -> None:
        """A hint that the pairs ``indexes`` are read next (a loader calls it with each batch).

        A source whose reads are slow one at a time (remote shards: one round trip each) fetches them
        together now; the default does nothing. Reads that fail here are tried again, and raise, when the
        pair itself is read.
        """


def prefetch(source: object, indexes: Sequence[int]) -> None:
    """Pass a loader's batch hint to ``source`` when it takes one (a :class:`PairSource`, a
    :class:`~lipkit.data.labelled.Subset` of one); other datasets have nothing to fetch ahead."""
    ahead = getattr(source, "prefetch", None)
    if callable(ahead):
        ahead(indexes)


def split_of(key: str, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """Stable train/val/test assignment by hashing ``key``: it never moves between runs or machines."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < fractions[0]:
        return "train"
    return "val" if h < fractions[0] + fractions[1] else "test"

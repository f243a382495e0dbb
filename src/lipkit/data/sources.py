"""Map-style image-text pair sources: synthetic pairs and the built-in corpora.

A source spec is ``NAME`` or ``NAME:SPLIT`` (``synthetic``, ``tuxpaint:train``); :func:`open_source`
resolves it through the :data:`SOURCES` registry. Every source returns, for an index, a PIL image
and a caption; the loader applies transforms and tokenisation.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lipkit.errors import LipkitError
from lipkit.registry import Registry

SPLITS = ("train", "val", "test")
SOURCES: Registry[Callable[..., PairSource]] = Registry("data source")


@dataclass(frozen=True)
class Pair:
    """One image-caption pair on disk."""

    key: str
    image_path: Path
    caption: str


class PairSource:
    """A list of pairs, indexable, that loads images lazily. Subclasses fill ``self.pairs``."""

    pairs: list[Pair]

    def __len__(self) -> int:
        return len(self.pairs)

    def caption(self, index: int) -> str:
        """The caption of pair ``index``."""
        return self.pairs[index].caption

    def image(self, index: int) -> Image.Image:
        """The image of pair ``index``, as loaded (mode as stored; transforms convert to RGB)."""
        with Image.open(self.pairs[index].image_path) as img:
            img.load()
            return img


def split_of(key: str, fractions: tuple[float, float] = (0.8, 0.1)) -> str:
    """Stable train/val/test assignment by hashing ``key``: it never moves between runs or machines."""
    h = int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big") / 2**64
    if h < fractions[0]:
        return "train"
    return "val" if h < fractions[0] + fractions[1] else "test"


class SyntheticPairs(PairSource):
    """Deterministic synthetic pairs for tests and benchmarks: learnable, but no files needed.

    Pair ``i`` belongs to class ``i % num_classes``; its image is that class's colour pattern plus noise
    seeded by ``i``, and its caption names the class, so a model can learn the pairing.

    Args:
        size: Number of pairs.
        num_classes: Number of distinct concepts.
        image_size: Side of the generated images.
        offset: Index offset, so that splits hold different samples.
    """

    WORDS = ("red", "green", "blue", "cat", "dog", "tree", "house", "car", "boat", "bird", "fish", "star")

    def __init__(self, size: int = 4096, num_classes: int = 12, image_size: int = 64, offset: int = 0) -> None:
        self.size = size
        self.offset = offset
        self.num_classes = num_classes
        self.image_size = image_size
        protos = np.random.default_rng(1234).uniform(0, 255, (num_classes, 4, 4, 3))
        self.prototypes = protos.astype(np.float32)

    def __len__(self) -> int:
        return self.size

    def caption(self, index: int) -> str:
        c = (index + self.offset) % self.num_classes
        return f"a photo of a {self.WORDS[c % len(self.WORDS)]} number {c}"

    def image(self, index: int) -> Image.Image:
        index += self.offset
        rng = np.random.default_rng(index)
        base = np.kron(
            self.prototypes[index % self.num_classes], np.ones((self.image_size // 4, self.image_size // 4, 1))
        )
        pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "RGB")


TUXPAINT_ROOT = Path("/usr/share/tuxpaint/stamps")


class TuxPaintPairs(PairSource):
    """Tux Paint stamps: ~950 PNG images with English captions (the first line of ``NAME.txt``).

    Args:
        split: ``train``, ``val``, ``test`` (fixed by key hash) or ``all``.
        root: The stamps folder (Debian package ``tuxpaint-stamps-default``).
    """

    def __init__(self, split: str = "train", root: Path = TUXPAINT_ROOT) -> None:
        if not root.is_dir():
            raise LipkitError(
                f"Tux Paint stamps not found at {root}; install them with "
                "`apt-get install tuxpaint-stamps-default` (or run `make setup`)"
            )
        self.pairs = [p for p in _scan_tuxpaint(root) if split == "all" or split_of(p.key) == split]
        if not self.pairs:
            raise LipkitError(f"no Tux Paint pairs found under {root} for split {split!r}")


def _scan_tuxpaint(root: Path) -> list[Pair]:
    pairs, skipped = [], 0
    for png in sorted(root.rglob("*.png")):
        if png.stem.endswith(("_mirror", "_flip")) or png.name.endswith("_thumb.png"):
            continue
        caption = _first_line(png.with_suffix(".txt"))
        if caption is None:
            skipped += 1
            continue
        pairs.append(Pair(str(png.relative_to(root).with_suffix("")), png, caption))
    if skipped:
        warnings.warn(f"Tux Paint: skipped {skipped} images without a caption file", stacklevel=3)
    return pairs


def _first_line(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None
    line = text.splitlines()[0].strip() if text else ""
    return line or None


@SOURCES.register("synthetic")
def _synthetic(split: str = "train", size: int = 4096) -> PairSource:
    if split in ("val", "test"):
        return SyntheticPairs(size=max(1, size // 8), offset=10**6 * (1 + (split == "test")))
    return SyntheticPairs(size=size)


@SOURCES.register("tuxpaint")
def _tuxpaint(split: str = "train") -> PairSource:
    return TuxPaintPairs(split)


def open_source(spec: str) -> PairSource:
    """Open a source from a spec ``NAME[:SPLIT]`` (e.g. ``tuxpaint:train``, ``synthetic``)."""
    name, _, split = spec.partition(":")
    split = split or "train"
    if split not in (*SPLITS, "all"):
        raise LipkitError(f"data spec {spec!r}: split must be one of train, val, test, all")
    return SOURCES.get(name)(split=split)

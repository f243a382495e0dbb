"""Registered named sources: synthetic pairs and the built-in corpora read from Debian packages.

A named source is ``NAME`` or ``NAME:SPLIT`` (``synthetic``, ``tuxpaint:train``, ``emoji:val``), resolved
through the :data:`SOURCES` registry by :func:`open_named`. The corpus readers here (Tux Paint stamps and
their captions, Noto Color Emoji) also feed the shard packer of :mod:`lipkit.data.builtin`.
"""

from __future__ import annotations

import functools
import inspect
import re
import unicodedata
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from lipkit.data.decode import decode_text, warn_caption_fallbacks
from lipkit.data.pairs import SPLITS, Pair, PairSource, split_of
from lipkit.data.prototypes import open_prototypes
from lipkit.errors import LipkitError
from lipkit.registry import Registry

SOURCES: Registry[Callable[..., PairSource]] = Registry("data source")


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

    def key(self, index: int) -> str:
        return f"synthetic/{index + self.offset}"

    def caption(self, index: int) -> str:
        c = (index + self.offset) % self.num_classes
        return f"a photo of a {self.WORDS[c % len(self.WORDS)]} number {c}"

    def image(self, index: int, draft: tuple[int, int] | None = None) -> Image.Image:
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

    Attributes:
        caption_fallbacks: Captions whose file was not UTF-8 (see :func:`lipkit.data.decode.decode_text`).
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
        self.caption_fallbacks = sum(p.caption_fallback for p in self.pairs)
        warn_caption_fallbacks("Tux Paint", self.caption_fallbacks)


def tuxpaint_stamps(root: Path = TUXPAINT_ROOT) -> list[Path]:
    """The stamp images under ``root``, sorted, without the mirrored, flipped and thumbnail variants."""
    return [
        png
        for png in sorted(root.rglob("*.png"))
        if not png.stem.endswith(("_mirror", "_flip")) and not png.name.endswith("_thumb.png")
    ]


def _scan_tuxpaint(root: Path) -> list[Pair]:
    pairs, skipped = [], 0
    for png in tuxpaint_stamps(root):
        captions, fell_back = tuxpaint_captions(png.with_suffix(".txt"))
        if "en" not in captions:
            skipped += 1
            continue
        pairs.append(Pair(str(png.relative_to(root).with_suffix("")), png, captions["en"], fell_back))
    if skipped:
        warnings.warn(f"Tux Paint: skipped {skipped} images without a caption file", stacklevel=3)
    return pairs


_TRANSLATION = re.compile(r"^([A-Za-z]{2,3}(?:_[A-Z]{2})?(?:@\w+)?)\.utf8=(.*)$")


def tuxpaint_captions(path: Path) -> tuple[dict[str, str], bool]:
    """A stamp's captions by language: ``en`` is the first line, then every ``xx.utf8=...`` translation.

    Returns:
        The captions (empty without an ``en`` one), and whether the file was not UTF-8 (it is then read
        as :func:`lipkit.data.decode.decode_text` says).
    """
    try:
        text, fell_back = decode_text(path.read_bytes())
    except OSError:
        return {}, False
    lines = text.strip().splitlines()
    captions = {"en": lines[0].strip()} if lines and lines[0].strip() else {}
    for line in lines[1:]:
        match = _TRANSLATION.match(line.strip())
        if match and match.group(2).strip():
            captions[match.group(1)] = match.group(2).strip()
    return (captions, fell_back) if "en" in captions else ({}, False)


EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI_SIZE = 109  # the one size of the font's colour bitmaps
_EMOJI_RANGES = ((0xA9, 0x3300), (0x1F000, 0x1FB00))
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)  # flags are pairs of these, not single emoji


@functools.lru_cache(maxsize=2)
def emoji_font(path: Path = EMOJI_FONT) -> ImageFont.FreeTypeFont:
    """The Noto Color Emoji font at its bitmap size."""
    if not path.is_file():
        raise LipkitError(
            f"Noto Color Emoji not found at {path}; install it with `apt-get install fonts-noto-color-emoji`"
        )
    return ImageFont.truetype(str(path), EMOJI_SIZE)


def render_emoji(char: str, path: Path = EMOJI_FONT) -> Image.Image:
    """Render one emoji in colour on a transparent background (RGBA, 136 x 128)."""
    font = emoji_font(path)
    _, _, right, bottom = font.getbbox(char)
    img = Image.new("RGBA", (max(1, right), max(1, bottom)), (0, 0, 0, 0))
    ImageDraw.Draw(img).text((0, 0), char, font=font, embedded_color=True)
    return img


@functools.lru_cache(maxsize=2)
def emoji_codepoints(path: Path = EMOJI_FONT) -> tuple[int, ...]:
    """The single-codepoint symbol emoji (Unicode category So) that the font draws, in code point order."""
    missing = render_emoji(chr(0x10FFFD), path).tobytes()  # a private-use code point: the font has no glyph
    found = []
    for lo, hi in _EMOJI_RANGES:
        for cp in range(lo, hi):
            if unicodedata.category(chr(cp)) != "So" or cp in _REGIONAL_INDICATORS:
                continue
            img = render_emoji(chr(cp), path)
            if img.getbbox() and img.tobytes() != missing:
                found.append(cp)
    return tuple(found)


class EmojiPairs(PairSource):
    """Noto Color Emoji: ~1,350 single-codepoint emoji rendered on the fly, captioned by their Unicode name.

    Args:
        split: ``train``, ``val``, ``test`` (fixed by key hash) or ``all``.
        font: The font file (Debian package ``fonts-noto-color-emoji``).
    """

    def __init__(self, split: str = "train", font: Path = EMOJI_FONT) -> None:
        self.font = font
        self.codepoints = [cp for cp in emoji_codepoints(font) if split == "all" or split_of(emoji_key(cp)) == split]
        if not self.codepoints:
            raise LipkitError(f"no emoji found in {font} for split {split!r}")

    def __len__(self) -> int:
        return len(self.codepoints)

    def key(self, index: int) -> str:
        return emoji_key(self.codepoints[index])

    def caption(self, index: int) -> str:
        return unicodedata.name(chr(self.codepoints[index])).lower()

    def image(self, index: int, draft: tuple[int, int] | None = None) -> Image.Image:
        return render_emoji(chr(self.codepoints[index]), self.font)


def emoji_key(codepoint: int) -> str:
    """The stable key of an emoji, e.g. ``emoji/1f436``."""
    return f"emoji/{codepoint:05x}"


@SOURCES.register("synthetic")
def _synthetic(split: str = "train", size: int = 4096) -> PairSource:
    if split in ("val", "test"):
        return SyntheticPairs(size=max(1, size // 8), offset=10**6 * (1 + (split == "test")))
    return SyntheticPairs(size=size)


@SOURCES.register("tuxpaint")
def _tuxpaint(split: str = "train") -> PairSource:
    return TuxPaintPairs(split)


@SOURCES.register("emoji")
def _emoji(split: str = "train") -> PairSource:
    return EmojiPairs(split)


SOURCES.add("prototypes", open_prototypes)  # classifier prototypes of the image tower (lipkit.data.prototypes)


def open_named(spec: str, **options: Any) -> PairSource:
    """Open a registered source from ``NAME[:SPLIT]`` (e.g. ``tuxpaint:train``, ``synthetic``).

    Args:
        spec: ``NAME[:SPLIT]``.
        **options: Keyword options the source takes (a data spec entry's ``options``).
    """
    name, _, split = spec.partition(":")
    split = split or "train"
    if split not in (*SPLITS, "all"):
        raise LipkitError(f"data spec {spec!r}: split must be one of train, val, test, all")
    factory = SOURCES.get(name)
    try:
        inspect.signature(factory).bind(split=split, **options)
    except TypeError as exc:
        raise LipkitError(f"data source {name!r}: {exc} (options given: {sorted(options)})") from None
    return factory(split=split, **options)

"""Image and caption decoding for the data pipeline: JPEG draft decoding, aspect-preserving resizes, text.

A JPEG can be decoded at 1/2, 1/4 or 1/8 of its size for a fraction of the cost of a full decode (the
inverse DCT simply skips the high frequencies). :func:`open_image` asks Pillow for the smallest such
version that is still at least the size the caller needs, so that a 1024-px photo bound for a 224-px
model is decoded at 256 px instead.

Captions read from files (caption sidecars, tables, ``.txt`` members of shards, corpus files) are decoded
by one policy, :func:`decode_text`: UTF-8, else Windows-1252, else Latin-1. Each reader counts the
captions that needed the fallback and warns once, with :func:`warn_caption_fallbacks`.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from pathlib import Path

from PIL import Image

DCT_SCALES = (8, 4, 2, 1)
# Image members of a webdataset sample, in the order a sample's image is picked: the formats that the
# packer and img2dataset write. A member of another format does not make a sample.
SHARD_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
# Image files of a folder listing: the shard formats and other formats Pillow reads.
IMAGE_FILE_SUFFIXES = (*(f".{ext}" for ext in SHARD_IMAGE_EXTENSIONS), ".bmp", ".gif", ".tif", ".tiff")
# Errors Pillow raises on corrupt, truncated or unsupported image data.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error, Image.DecompressionBombError)


CAPTION_FALLBACK = "Windows-1252 (Latin-1)"  # how messages name the fallback encodings


class BadSample(Exception):
    """A sample cannot be served (unreadable image or caption); the loader and packer count these and go on."""

    reason = "bad_sample"


class UndecodableImage(BadSample):
    """An image could not be read or decoded."""

    reason = "undecodable_image"


class UnreadableCaption(BadSample):
    """A caption could not be read."""

    reason = "unreadable_caption"


def draft_scale(size: tuple[int, int], box: tuple[int, int]) -> int:
    """The DCT scale (1, 2, 4 or 8) Pillow's draft mode picks: the largest that keeps both sides >= ``box``."""
    fit = min(size[0] // max(1, box[0]), size[1] // max(1, box[1]))
    return next(s for s in DCT_SCALES if fit >= s)


def open_image(data: bytes | str | Path, draft: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image fully, from bytes or a file.

    Args:
        data: Encoded bytes or a path.
        draft: Minimum (width, height) needed: a JPEG is decoded at the smallest DCT scale that still
            covers it. ``None`` decodes at full size.

    Raises:
        UndecodableImage: The data is missing, truncated, corrupt or not an image.
    """
    try:
        img = Image.open(io.BytesIO(data) if isinstance(data, (bytes, bytearray, memoryview)) else data)
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", draft)
        img.load()
    except DECODE_ERRORS as exc:
        raise UndecodableImage(f"{type(exc).__name__}: {exc}") from None
    return img


def open_for_max_side(data: bytes, max_side: int | None) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an image that will be shrunk to ``max_side``, with draft decoding; also returns its original size.

    Raises:
        UndecodableImage: The data is truncated, corrupt or not an image.
    """
    try:
        img = Image.open(io.BytesIO(data))
        original = img.size
        target = fit_max_side(original, max_side)
        if target != original and img.format == "JPEG":
            img.draft("RGB", target)
        img.load()
    except DECODE_ERRORS as exc:
        raise UndecodableImage(f"{type(exc).__name__}: {exc}") from None
    return img, original


def fit_max_side(size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """The size after shrinking ``size`` so that its longer side is at most ``max_side`` (never enlarging)."""
    w, h = size
    if max_side is None or max(w, h) <= max_side:
        return w, h
    scale = max_side / max(w, h)
    return max(1, round(w * scale)), max(1, round(h * scale))


def resize_max_side(img: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink ``img`` so that its longer side is at most ``max_side``, keeping the aspect ratio (Lanczos)."""
    target = fit_max_side(img.size, max_side)
    return img if target == img.size else img.resize(target, Image.Resampling.LANCZOS)


def flatten(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``img`` as RGB, with any transparency composited onto ``background``."""
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def encode_image(img: Image.Image, fmt: str = "jpg", quality: int = 95) -> bytes:
    """Encode ``img`` as ``jpg`` (RGB, transparency flattened onto white), ``png`` or ``webp``."""
    buf = io.BytesIO()
    if fmt == "jpg":
        flatten(img).save(buf, "JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, "WEBP", quality=quality)
    else:
        img.save(buf, "PNG")
    return buf.getvalue()


def decode_text(data: bytes) -> tuple[str, bool]:
    """Decode caption bytes: UTF-8, else Windows-1252, else Latin-1 (which reads any bytes), so it never fails.

    Windows-1252 is the superset of Latin-1 that most text labelled "Latin-1" actually is; only bytes it
    leaves undefined (0x81, 0x8D, 0x8F, 0x90, 0x9D) send the whole text on to Latin-1.

    Returns:
        The text, and whether it was not valid UTF-8 (a fallback decoded it).
    """
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        pass
    try:
        return data.decode("cp1252"), True
    except UnicodeDecodeError:
        return data.decode("latin-1"), True


def warn_caption_fallbacks(where: str, count: int, stacklevel: int = 3) -> None:
    """Warn (one line) that ``count`` captions of ``where`` were not UTF-8; nothing when ``count`` is 0."""
    if count:
        warnings.warn(
            f"{where}: {count} captions are not valid UTF-8 and were read as {CAPTION_FALLBACK}", stacklevel=stacklevel
        )

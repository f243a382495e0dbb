"""Uploaded images: size and type checks, decoding, and thumbnails for added items."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

from PIL import Image, UnidentifiedImageError

from lipkit.serve.limits import ApiError, Limits

THUMBNAIL_SIDE = 160


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """The picture in ``data``, decoded (in its own mode: the model's transform converts it).

    Raises:
        ApiError: 413 when ``data`` is over the upload limit or the picture has too many pixels; 415 when it is
            empty or not a picture PIL can read.
    """
    if len(data) > limits.max_upload_bytes:
        raise ApiError(413, "too_large", f"the image is {len(data)} bytes; the limit is {limits.max_upload_bytes}")
    if not data:
        raise ApiError(415, "not_an_image", "the upload is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.width * image.height > limits.max_pixels:
                raise ApiError(
                    413,
                    "too_large",
                    f"the image is {image.width}x{image.height}; the limit is {limits.max_pixels} pixels",
                )
            image.load()
        return image
    except ApiError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError, Warning) as exc:
        raise ApiError(415, "not_an_image", f"the upload is not an image that can be read: {exc}") from None


def decode_base64_image(text: str, limits: Limits) -> Image.Image:
    """An image given as base64 text (as clip-retrieval's clients send it), decoded and checked.

    Raises:
        ApiError: 422 for text that is not base64, and :func:`decode_image`'s errors.
    """
    if len(text) > limits.max_upload_bytes * 4 // 3 + 4:
        raise ApiError(413, "too_large", f"the image is over the upload limit of {limits.max_upload_bytes} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(422, "invalid_base64", "the image is not valid base64 text") from None
    return decode_image(data, limits)


def thumbnail_jpeg(image: Image.Image) -> bytes:
    """A JPEG of ``image`` whose longest side is at most :data:`THUMBNAIL_SIDE` pixels."""
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    if small.mode in ("RGBA", "LA", "P"):  # transparent parts become white, not black
        small = small.convert("RGBA")
        small = Image.alpha_composite(Image.new("RGBA", small.size, "white"), small)
    out = io.BytesIO()
    small.convert("RGB").save(out, format="JPEG", quality=85)
    return out.getvalue()

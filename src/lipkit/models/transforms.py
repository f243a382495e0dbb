"""Image preprocessing for the image tower.

The evaluation transform reproduces OpenAI CLIP's ``preprocess``: resize the short side to ``image_size``
with bicubic interpolation on the PIL image, centre crop, convert to a float tensor in [0, 1] and normalise
with the CLIP dataset statistics. The training transform swaps resize + crop for a ``RandomResizedCrop``.

Both transforms first convert the image to RGB. Images with transparency (RGBA, LA, palette or greyscale
with a transparent colour) are composited onto ``fill_alpha`` instead of having their alpha dropped, which
would expose whatever colour the fully transparent pixels happen to store.

Every piece is a module-level class, so the transforms pickle into DataLoader worker processes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from lipkit.errors import ConfigError, LipkitError, suggest

__all__ = [
    "OPENAI_MEAN",
    "OPENAI_STD",
    "PreprocessConfig",
    "ToRGB",
    "image_transform",
]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_INTERPOLATIONS = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR}
_RESIZE_MODES = ("shortest", "squash")
# Modes whose pixels carry an alpha channel (La / RGBa are premultiplied); PIL converts all of them to RGBA.
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


@dataclass
class PreprocessConfig:
    """How images are turned into the image tower's input tensor.

    Attributes:
        image_size: Side of the square output, in pixels.
        mean: Per-channel mean subtracted after scaling to [0, 1].
        std: Per-channel standard deviation divided by after subtracting the mean.
        interpolation: ``"bicubic"`` or ``"bilinear"``.
        resize_mode: ``"shortest"`` (resize the short side, then centre crop) or ``"squash"`` (resize both
            sides to ``image_size``, ignoring the aspect ratio). Evaluation only.
        train_scale: Range of the crop area, as a fraction of the image area, for ``RandomResizedCrop``.
        train_ratio: Range of the crop aspect ratio (width / height) for ``RandomResizedCrop``.
        fill_alpha: RGB colour that transparent images are composited onto.
        train_grayscale: Probability that the training transform turns an image grey (all three channels
            equal); 0 turns it off. Helps transfer to greyscale evaluation sets such as (Fashion-)MNIST.
        train_lowres: Probability that the training transform shows an image at low resolution: shrunk
            to ``train_lowres_size`` pixels a side, then enlarged back (:class:`LowResolution`); 0 turns
            it off. For evaluation sets of small images, such as (Fashion-)MNIST's 28 px.
        train_lowres_size: The side, in pixels, that ``train_lowres`` shrinks images to.
        train_invert: Probability that the training transform negates an image (each channel ``c`` becomes
            ``255 - c``); 0 turns it off. For evaluation sets of negatives, such as Fashion-MNIST (product
            photos on white, negated: light garments on black) and MNIST (light strokes on black).
    """

    image_size: int = 224
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    train_scale: tuple[float, float] = (0.9, 1.0)
    train_ratio: tuple[float, float] = (0.75, 1.3333333333333333)
    fill_alpha: tuple[int, int, int] = (255, 255, 255)
    train_grayscale: float = 0.0
    train_lowres: float = 0.0
    train_lowres_size: int = 28
    train_invert: float = 0.0

    def validate(self) -> None:
        """Check every field.

        Raises:
            ConfigError: A field has an invalid value; the message names the field.
        """
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size <= 0:
            raise ConfigError(f"preprocess image_size must be a positive integer, got {self.image_size!r}")
        _check_choice("interpolation", self.interpolation, list(_INTERPOLATIONS))
        _check_choice("resize_mode", self.resize_mode, list(_RESIZE_MODES))
        _check_triple("mean", self.mean)
        _check_triple("std", self.std)
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"preprocess std must be positive, got {tuple(self.std)!r}")
        _check_range("train_scale", self.train_scale, upper=1.0)
        _check_range("train_ratio", self.train_ratio, upper=None)
        _check_triple("fill_alpha", self.fill_alpha)
        if not all(isinstance(c, int) and 0 <= c <= 255 for c in self.fill_alpha):
            raise ConfigError(f"preprocess fill_alpha must be three integers in [0, 255], got {self.fill_alpha!r}")
        for name in ("train_grayscale", "train_lowres", "train_invert"):
            g = getattr(self, name)
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not 0.0 <= g <= 1.0:
                raise ConfigError(f"preprocess {name} must be a probability in [0, 1], got {g!r}")
        side = self.train_lowres_size
        if isinstance(side, bool) or not isinstance(side, int) or not 0 < side <= self.image_size:
            raise ConfigError(
                f"preprocess train_lowres_size must be a positive integer up to image_size ({self.image_size}), "
                f"got {side!r}"
            )


def _check_choice(field: str, value: object, choices: list[str]) -> None:
    if value not in choices:
        hint = suggest(value, choices) if isinstance(value, str) else ""
        raise ConfigError(f"preprocess {field} must be one of {', '.join(choices)}, got {value!r}.{hint}")


def _check_triple(field: str, value: object) -> None:
    if not isinstance(value, (tuple, list)) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
        raise ConfigError(f"preprocess {field} must be three numbers (one per RGB channel), got {value!r}")


def _check_range(field: str, value: object, upper: float | None) -> None:
    """Require ``value`` to be a pair ``0 < lo <= hi`` (and ``hi <= upper`` when given)."""
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)
    if ok:
        lo, hi = value
        ok = 0 < lo <= hi and (upper is None or hi <= upper)
    if not ok:
        bound = f" <= {upper}" if upper is not None else ""
        raise ConfigError(f"preprocess {field} must be a pair (lo, hi) with 0 < lo <= hi{bound}, got {value!r}")


class ToRGB:
    """Convert a PIL image to RGB, compositing any transparency onto a solid background colour.

    Args:
        fill: Background RGB colour shown through transparent pixels.
    """

    def __init__(self, fill: tuple[int, int, int] = (255, 255, 255)) -> None:
        self.fill = tuple(int(c) for c in fill)

    def __call__(self, image: Image.Image) -> Image.Image:
        """Return ``image`` as an RGB image (``image`` itself when it already is one without transparency)."""
        if not isinstance(image, Image.Image):
            raise LipkitError(f"image transforms expect a PIL image, got {type(image).__name__}")
        if image.mode in _ALPHA_MODES or "transparency" in image.info:
            rgba = image.convert("RGBA")
            background = Image.new("RGBA", rgba.size, (*self.fill, 255))
            return Image.alpha_composite(background, rgba).convert("RGB")
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(fill={self.fill})"


class LowResolution:
    """With probability ``p``, shrink an image to ``side`` pixels a side (averaging the pixels it merges),
    then enlarge it back to its size with ``interpolation``: what a small image looks like at the input
    size. The draw comes from torch's generator, as torchvision's random transforms take theirs.
    """

    def __init__(self, p: float, side: int, interpolation: InterpolationMode) -> None:
        self.p, self.side, self.interpolation = float(p), int(side), interpolation

    def __call__(self, image: Image.Image) -> Image.Image:
        if torch.rand(1).item() >= self.p:
            return image
        small = image.resize((self.side, self.side), Image.Resampling.BOX)
        return T.functional.resize(small, [image.height, image.width], self.interpolation, antialias=True)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(p={self.p}, side={self.side})"


def image_transform(cfg: PreprocessConfig, train: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Build the transform from a PIL image to a normalised (3, S, S) float tensor, S = ``cfg.image_size``.

    Args:
        cfg: The preprocessing settings; validated here.
        train: Build the random training augmentation instead of the deterministic evaluation transform.

    Returns:
        A picklable callable.

    Raises:
        ConfigError: ``cfg`` is invalid.
    """
    cfg.validate()
    interpolation = _INTERPOLATIONS[cfg.interpolation]
    size = cfg.image_size
    if train:
        geometry = [T.RandomResizedCrop(size, cfg.train_scale, cfg.train_ratio, interpolation, antialias=True)]
        if cfg.train_lowres > 0:
            geometry.append(LowResolution(cfg.train_lowres, cfg.train_lowres_size, interpolation))
        if cfg.train_invert > 0:
            geometry.append(T.RandomInvert(cfg.train_invert))
        if cfg.train_grayscale > 0:
            geometry.append(T.RandomGrayscale(cfg.train_grayscale))
    elif cfg.resize_mode == "squash":
        geometry = [T.Resize((size, size), interpolation, antialias=True)]
    else:  # shortest: short side -> size (long side truncated to int, as in CLIP), then the centre square
        geometry = [T.Resize(size, interpolation, antialias=True), T.CenterCrop(size)]
    return T.Compose([ToRGB(cfg.fill_alpha), *geometry, T.ToTensor(), T.Normalize(cfg.mean, cfg.std)])

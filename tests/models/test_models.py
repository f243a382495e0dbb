from __future__ import annotations

import pytest
import torch

import lipkit
from lipkit.errors import ConfigError, UnknownNameError
from lipkit.models import DualEncoderOutput, get_model_config
from lipkit.models.config import UnsupportedModelError, list_models, model_family

SMALL = ["micro", "tiny", "tiny-siglip"]


BUILDABLE = list_models(buildable=True)
# lipkit's own configs, and OpenCLIP configs of several families; `make test-exhaustive` builds every one
QUICK = [n for n in BUILDABLE if not model_family(n)] + [
    "RN50", "ViT-B-32", "ViT-B-16-SigLIP2", "ViT-L-14-CLIPA", "convnext_tiny", "MobileCLIP-S1", "roberta-ViT-B-32",
]  # fmt: skip


def check_builds(name):
    with torch.device("meta"):
        model = lipkit.create_model(name)
    cfg = get_model_config(name)
    assert model.context_length == cfg.text_config().context_length
    assert model.visual.output_dim == model.text.output_dim == cfg.embed_dim


@pytest.mark.parametrize("name", QUICK)
def test_registered_configs_build(name):
    check_builds(name)


@pytest.mark.exhaustive  # every buildable config, OpenCLIP's included, on the meta device
@pytest.mark.parametrize("name", BUILDABLE)
def test_every_registered_config_builds(name):
    check_builds(name)


def test_configs_that_cannot_be_built_yet_say_why(monkeypatch):
    from lipkit.models import config as model_config

    assert set(list_models()) == set(BUILDABLE)  # every built-in config builds, OpenCLIP's 144 included
    marked = {"family": "future", "unsupported": "needs the future tower"}
    configs = {**model_config._builtin_configs(), "future-net": marked}
    monkeypatch.setattr(model_config, "_builtin_configs", lambda: configs)
    assert set(list_models()) - set(list_models(buildable=True)) == {"future-net"}
    with pytest.raises(UnsupportedModelError, match=r"'future-net' \(future\) cannot be built yet: needs the future"):
        lipkit.create_model("future-net")


@pytest.mark.parametrize("name", SMALL)
def test_small_models_forward_and_backward(name):
    torch.manual_seed(0)
    model = lipkit.create_model(name).train()
    size = model.visual.cfg.image_size
    tokens = lipkit.get_tokenizer(name)(["a red cat", "a blue dog", "two birds"])
    out = model(torch.randn(3, 3, size, size), tokens)
    assert isinstance(out, DualEncoderOutput)
    assert out.image_features.shape == out.text_features.shape == (3, model.cfg.embed_dim)
    assert torch.allclose(out.image_features.norm(dim=-1), torch.ones(3), atol=1e-5)
    (out.image_features @ out.text_features.T).sum().backward()
    first_layers = (model.visual.patch_embed.weight, model.text.token_embed.weight)
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in first_layers)  # both towers get gradients


def test_encode_normalize_flag_and_logit_scale_clamp():
    model = lipkit.create_model("micro")
    images = torch.randn(2, 3, 32, 32)
    raw = model.encode_image(images)
    assert torch.allclose(model.encode_image(images, normalize=True), raw / raw.norm(dim=-1, keepdim=True), atol=1e-6)
    assert torch.isclose(model.scale(), torch.tensor(1 / 0.07), rtol=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert torch.isclose(model.scale(), torch.tensor(100.0))


def test_siglip_config_has_bias_and_init_values():
    model = lipkit.create_model("tiny-siglip")
    assert torch.isclose(model.scale(), torch.tensor(10.0)) and model.logit_bias.item() == -10.0
    assert model.visual.cls_token is None and model.visual.attn_pool is not None


def test_pooling_variants_and_text_eot_pooling_uses_the_end_token():
    model = lipkit.create_model("micro", vision={"pool": "mean"}, text={"causal": True})
    assert model.visual.cfg.pool == "mean"
    tokens = lipkit.get_tokenizer("micro")(["a cat"])
    # Changing tokens after the end token cannot change a causal model's EOT embedding.
    padded = tokens.clone()
    eot = int(tokens.argmax())
    padded[0, eot + 1 :] = 5
    assert torch.allclose(model.encode_text(tokens), model.encode_text(padded), atol=1e-6)


def test_patch_dropout_only_in_training():
    model = lipkit.create_model("micro", vision={"patch_dropout": 0.5})
    x = model.visual.embed(torch.randn(2, 3, 32, 32))
    model.train()
    assert model.visual.drop_patches(x).shape[1] == 1 + 8
    model.eval()
    assert model.visual.drop_patches(x).shape[1] == 1 + 16


def test_locked_tower_freezes_trunk_and_stays_in_eval_mode():
    model = lipkit.create_model("micro", lock_image=True).train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "visual.proj.weight" in trainable and "visual.patch_embed.weight" not in trainable
    assert not model.visual.transformer.training and model.text.training


def test_overrides_and_bad_configs():
    assert lipkit.create_model("micro", embed_dim=32).cfg.embed_dim == 32
    with pytest.raises(UnknownNameError, match="Did you mean: ViT-B-32"):
        lipkit.create_model("ViT-B-23")
    with pytest.raises(ConfigError, match=r"vision.pacth_size"):
        lipkit.create_model("micro", vision={"pacth_size": 4})
    with pytest.raises(ConfigError, match="smaller than patch_size"):
        lipkit.create_model("micro", vision={"patch_size": 64})
    with pytest.raises(ConfigError, match=r"vision.type"):
        lipkit.create_model("micro", vision={"type": "convnext"})


def test_too_long_text_is_a_clear_error():
    model = lipkit.create_model("micro")
    with pytest.raises(lipkit.errors.LipkitError, match="context_length is 16"):
        model.encode_text(torch.zeros(1, 20, dtype=torch.long))


def test_image_transform_matches_model_size():
    from PIL import Image

    t = lipkit.image_transform("tiny")
    assert t(Image.new("RGB", (100, 80))).shape == (3, 64, 64)
    assert lipkit.image_transform("tiny", train=True)(Image.new("RGBA", (50, 90))).shape == (3, 64, 64)

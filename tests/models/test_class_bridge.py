"""The class bridge: the frozen tower's classifier weights the text embeddings of its class names."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import lipkit
from lipkit.data.prototypes import read_hypernyms
from lipkit.errors import ConfigError, LipkitError
from lipkit.models.convert import export_openclip
from lipkit.train import checkpoint as ckpt
from lipkit.train import loop
from lipkit.train.config import resolve_config
from lipkit.train.metrics import read_metrics

pytest.importorskip("timm")

CLASSES = "red, crimson\ngreen\nblue, azure, navy\n"


@pytest.fixture
def bridged(headed_model, tmp_path):
    """The headed model's config file with a class bridge over three named classes."""
    path, head = headed_model
    names = tmp_path / "classes.txt"
    names.write_text(CLASSES)
    config = json.loads(Path(path).read_text())
    config |= {"class_bridge": str(names), "class_bridge_weight": 0.7, "class_bridge_temperature": 2.0}
    (tmp_path / "bridged.json").write_text(json.dumps(config))
    return str(tmp_path / "bridged.json"), head


def class_embeddings(model, captions, classes):
    """What the bridge's class embeddings must be: each class's normalised mean of its unit caption embeddings."""
    with torch.no_grad():
        emb = model.encode_text(lipkit.get_tokenizer(model.cfg)(captions), normalize=True)
    return torch.stack([F.normalize(emb[classes == c].mean(0), dim=0) for c in range(3)])


def test_image_embedding_adds_the_class_names_weighted_by_the_classifier(bridged):
    path, head = bridged
    model = lipkit.create_model(path)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        plain = model.visual(images)
        assert torch.equal(model.encode_image(images), plain)  # no names yet: the bridge adds nothing
        captions = [
            "a photo of a red.",
            "a photo of a crimson.",
            "a photo of a green.",
            *(f"a photo of a {c}." for c in ("blue", "azure", "navy")),
        ]
        classes = torch.tensor([0, 0, 1, 2, 2, 2])
        tokenize = lipkit.get_tokenizer(model.cfg)
        model.refresh_bridge([tokenize(captions[:2]), tokenize(captions[2:])], classes)
        names = class_embeddings(model, captions, classes)
        assert torch.allclose(model.bridge_text, names, atol=1e-6)
        probs = (model.visual.features(images) @ head.T / 2.0).softmax(-1)
        want = plain + 0.7 * plain.norm(dim=-1, keepdim=True) * (probs @ names)
        assert torch.allclose(model.encode_image(images), want, atol=1e-5)
        assert not torch.allclose(want, plain, atol=1e-3)


@pytest.mark.parametrize("unlock", [0, 1])
def test_training_refreshes_the_names_and_checkpoints_match_the_text_tower(bridged, run_overrides, tmp_path, unlock):
    """Cached training (with the top text layer trained or not) learns the bridge weight, and the
    checkpoint's class embeddings are those its own text tower gives."""
    path, _ = bridged
    overrides = [
        *run_overrides,
        f"model={path}",
        "cache_features=true",
        f"feature_cache_dir={tmp_path / 'c'}",
        "data.train=synthetic:val",
        "steps=5",
        "log_every=1",
        "bridge_every=2",
        f"model_overrides.unlock_text_layers={unlock}",
    ]
    result = loop.train(resolve_config("tiny-synthetic", overrides=overrides))
    model = lipkit.create_model(path, pretrained=str(result.checkpoint), unlock_text_layers=unlock)
    saved = model.bridge_text.clone()
    assert float(model.bridge_weight.detach()) != pytest.approx(0.7)  # the weight is learned
    captions = [f"a photo of a {c}." for c in ("red", "crimson", "green", "blue", "azure", "navy")]
    classes = torch.tensor([0, 0, 1, 2, 2, 2])
    assert torch.allclose(saved, class_embeddings(model, captions, classes), atol=1e-5)
    assert saved.norm(dim=-1) == pytest.approx(torch.ones(3), abs=1e-5)


def test_full_training_equals_cached_training_and_resumes_exactly(bridged, run_overrides, tmp_path):
    path, _ = bridged
    common = [
        *run_overrides,
        f"model={path}",
        "data.train=synthetic:val",
        "steps=6",
        "log_every=1",
        "checkpoint_every=3",
        "keep_checkpoints=3",
        "bridge_every=2",
        "data.augment=false",
        "model_overrides.unlock_text_layers=1",
    ]
    cache = ["cache_features=true", f"feature_cache_dir={tmp_path / 'c'}"]
    cached = loop.train(resolve_config("tiny-synthetic", overrides=[*common, *cache, "name=cached"]))
    full = loop.train(resolve_config("tiny-synthetic", overrides=[*common, "name=full"]))
    want = [r[k] for r in read_metrics(cached.run_dir) for k in ("loss", "grad_norm")]
    got = [r[k] for r in read_metrics(full.run_dir) for k in ("loss", "grad_norm")]
    assert len(got) == 12 and got == pytest.approx(want, rel=1e-4)
    # stopped during step 4 (the checkpoint of step 3 falls between two refreshes), then resumed: the same
    # steps as the run that did not stop

    def stop_at_4(step, metrics):
        if step == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.train(resolve_config("tiny-synthetic", overrides=[*common, *cache, "name=cut"]), callbacks=(stop_at_4,))
    resumed = loop.train(resolve_config("tiny-synthetic", overrides=[*common, *cache, "name=cut", "resume=latest"]))
    again = [r[k] for r in read_metrics(resumed.run_dir) for k in ("loss", "grad_norm")]
    assert again == pytest.approx(want, rel=1e-5)
    a, b = ckpt.load_checkpoint(cached.checkpoint)["model"], ckpt.load_checkpoint(resumed.checkpoint)["model"]
    assert torch.allclose(a["bridge_text"], b["bridge_text"], atol=1e-6)


def test_clear_errors(bridged, headed_model, run_overrides, tmp_path):
    path, _ = bridged
    with pytest.raises(ConfigError, match="lock_image=true"):
        lipkit.create_model(path, lock_image=False)
    with pytest.raises(ConfigError, match="class_bridge_temperature must be > 0"):
        lipkit.create_model(path, class_bridge_temperature=0.0)
    with pytest.raises(ConfigError, match="ships its classifier"):
        lipkit.create_model("micro", lock_image=True, class_bridge="imagenet-1k")
    with pytest.raises(LipkitError, match="OpenCLIP has no such part"):
        export_openclip(lipkit.create_model(path), tmp_path / "out.pt")
    assert not (tmp_path / "out.pt").exists()
    two = tmp_path / "two.txt"
    two.write_text("red\ngreen\n")
    overrides = [*run_overrides, f"model={path}", f"model_overrides.class_bridge={two}", "data.train=synthetic:val"]
    with pytest.raises(ConfigError, match="names 2 classes, the image tower's classifier has 3"):
        loop.train(resolve_config("tiny-synthetic", overrides=[*overrides, "steps=1"]))
    with pytest.raises(ConfigError, match="bridge_every must be at least 1"):
        resolve_config("tiny-synthetic", overrides=[*overrides, "bridge_every=0"])


def test_definitions_join_each_imagenet_class_s_bridge_captions(bridged):
    """With ``class_bridge_definitions`` every ImageNet class gets one more bridge caption, its definition."""
    path, _ = bridged
    real = lipkit.create_model(path)
    counts = {}
    for definitions in (False, True):
        cfg = dataclasses.replace(real.cfg, class_bridge="imagenet-1k", class_bridge_definitions=definitions)
        stub = SimpleNamespace(cfg=cfg, bridge_head=torch.zeros(1000, 1))
        chunks, classes = loop.bridge_inputs(stub, torch.device("cpu"))
        assert sum(len(chunk) for chunk in chunks) == len(classes)
        counts[definitions] = torch.bincount(classes, minlength=1000)
    assert counts[False][608] == 3 and counts[False][841] == 1  # jean, blue jean, denim; sweatshirt
    assert torch.equal(counts[True], counts[False] + 1)


def test_hypernyms_join_each_imagenet_class_s_bridge_captions(bridged):
    """With ``class_bridge_hypernyms`` every ImageNet class gets a bridge caption per WordNet hypernym."""
    path, _ = bridged
    real = lipkit.create_model(path)
    counts = {}
    for form in ("", "name", "kind"):
        cfg = dataclasses.replace(real.cfg, class_bridge="imagenet-1k", class_bridge_hypernyms=form)
        stub = SimpleNamespace(cfg=cfg, bridge_head=torch.zeros(1000, 1))
        chunks, classes = loop.bridge_inputs(stub, torch.device("cpu"))
        counts[form] = torch.bincount(classes, minlength=1000)
        assert sum(len(chunk) for chunk in chunks) == len(classes)
    more = torch.tensor([len(h) for h in read_hypernyms("imagenet-1k")])
    assert more[608] == 2 and more[841] == 1  # jean: trouser, workwear; sweatshirt: pullover
    assert torch.equal(counts["name"], counts[""] + more) and torch.equal(counts["kind"], counts[""] + more)
    with pytest.raises(ConfigError, match="needs a class bridge"):
        lipkit.create_model(path, class_bridge="", class_bridge_hypernyms="name")
    with pytest.raises(ConfigError, match="must be name or kind"):
        lipkit.create_model(path, class_bridge_hypernyms="yes")


def test_definitions_need_an_imagenet_bridge(bridged, run_overrides):
    path, _ = bridged
    with pytest.raises(ConfigError, match="needs a class bridge"):
        lipkit.create_model(path, class_bridge="", class_bridge_definitions=True)
    overrides = [*run_overrides, f"model={path}", "model_overrides.class_bridge_definitions=true"]
    with pytest.raises(ConfigError, match="have none"):
        loop.train(resolve_config("tiny-synthetic", overrides=[*overrides, "data.train=synthetic:val", "steps=1"]))

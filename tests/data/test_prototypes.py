"""Classifier prototypes as training pairs: placement, captions, mixing, cached and full training, errors."""

from __future__ import annotations

import pytest
import torch

import lipkit
from lipkit.data.loader import ResumableBatchSampler, stack_images
from lipkit.data.prototypes import (
    FeaturePoint,
    Placement,
    PrototypePairs,
    open_prototypes,
    place,
    read_classnames,
    read_definitions,
    read_hypernyms,
    tower_head,
)
from lipkit.data.spec import open_mixture
from lipkit.errors import ConfigError, LipkitError
from lipkit.models.image_inputs import MixedImages
from lipkit.train import feature_cache, loop
from lipkit.train.config import resolve_config
from lipkit.train.metrics import read_metrics

timm = pytest.importorskip("timm")


def test_norm_placement_scales_each_row_to_the_mean_feature_norm():
    head = torch.tensor([[2.0, 0.0], [0.0, -5.0]])
    features = torch.tensor([[3.0, 4.0], [6.0, 8.0]])  # norms 5 and 10
    placed = place(head, features, Placement.parse("norm"))
    assert torch.equal(placed, torch.tensor([[7.5, 0.0], [0.0, -7.5]]))


def test_mean_plus_k_std_placement_moves_k_deviations_along_each_row():
    head = torch.tensor([[2.0, 0.0], [0.0, -5.0]])
    features = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, 2.0], [3.0, 2.0]])  # mean (2, 1); std 1 along both rows
    assert torch.equal(place(head, features, Placement.parse("mean+3std")), torch.tensor([[5.0, 1.0], [2.0, -2.0]]))
    assert torch.equal(place(head, features, Placement.parse("mean+0.5std")), torch.tensor([[2.5, 1.0], [2.0, 0.5]]))
    assert str(Placement.parse("mean+3std")) == "mean+3std"
    with pytest.raises(ConfigError, match="mean\\+Kstd"):
        Placement.parse("mean+std")


def test_captions_come_from_the_templates_with_every_synonym():
    names = [["jean", "blue jean", "denim"], ["sandal"]]
    each = PrototypePairs(names, ["a photo of a {c}.", "a {c}"], label_set="clothes")
    assert [each.caption(i) for i in range(len(each))] == [
        "a photo of a jean.",
        "a jean",
        "a photo of a blue jean.",
        "a blue jean",
        "a photo of a denim.",
        "a denim",
        "a photo of a sandal.",
        "a sandal",
    ]
    assert each.classes() == [0, 0, 0, 0, 0, 0, 1, 1]
    assert len({each.key(i) for i in range(len(each))}) == 8
    assert each.key(7) == "prototypes/clothes/00001/7"
    first = PrototypePairs(names, captions="first")
    assert [first.caption(i) for i in range(len(first))] == ["a photo of a jean.", "a photo of a sandal."]
    with pytest.raises(LipkitError, match="no images"):
        first.image(0)


def test_features_are_the_head_rows_placed_once_per_caption():
    source = PrototypePairs([["a", "b"], ["c"]], placement="norm")
    head = torch.tensor([[0.0, 3.0], [4.0, 0.0]])
    rows = source.features(head, torch.tensor([[0.0, 2.0]]))
    assert torch.equal(rows, torch.tensor([[0.0, 2.0], [0.0, 2.0], [2.0, 0.0]]))


def test_builtin_imagenet_class_names_have_their_synonyms():
    wordnet = read_classnames("imagenet-1k")
    assert len(wordnet) == 1000 and wordnet[608] == ["jean", "blue jean", "denim"]
    assert read_classnames("imagenet-1k-clip")[608] == ["jeans"]
    assert read_classnames("imagenet-1k-both")[608] == ["jeans", "jean", "blue jean", "denim"]


def test_definitions_add_a_pair_per_class_captioned_with_its_first_name_and_gloss():
    names = [["jean", "blue jean"], ["sandal"], ["thing"]]
    glosses = ["close-fitting trousers of heavy denim.", "a shoe fastened by straps", ""]
    source = PrototypePairs(names, ["a photo of a {c}.", "a {c}"], definitions=glosses)
    assert [source.caption(i) for i in range(len(source))][-4:] == [
        "a photo of a jean, close-fitting trousers of heavy denim.",
        "a jean, close-fitting trousers of heavy denim",
        "a photo of a sandal, a shoe fastened by straps.",
        "a sandal, a shoe fastened by straps",
    ]
    assert len(source) == 4 * 2 + 2 * 2  # a class without a definition gets no further pair
    assert source.classes()[-4:] == [0, 0, 1, 1]
    with pytest.raises(ConfigError, match="2 given for 3 classes"):
        PrototypePairs(names, definitions=glosses[:2])


def test_imagenet_definitions_are_wordnet_glosses_in_head_row_order():
    glosses = read_definitions("imagenet-1k-both")
    assert len(glosses) == 1000 and all(glosses)
    assert glosses[608] == "(usually plural) close-fitting trousers of heavy denim for manual work or casual wear"
    assert glosses[841] == "cotton knit pullover with long sleeves worn during athletic activity"
    source = open_prototypes(classnames="imagenet-1k", definitions=True)
    assert len(source) == len(open_prototypes(classnames="imagenet-1k")) + 1000
    assert (
        source.caption(len(source) - 1) == "a photo of a toilet tissue, a soft thin absorbent paper for use in toilets."
    )


def test_definitions_are_refused_where_none_exist(tmp_path):
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(ConfigError, match="have none"):
        open_prototypes(classnames=str(names), definitions=True)
    with pytest.raises(ConfigError, match="true or false"):
        open_prototypes(definitions="yes")


def test_hypernyms_add_a_pair_per_broader_name_in_either_form():
    names = [["jean", "blue jean"], ["sandal"], ["thing"]]
    broader = [["trouser", "workwear"], ["shoe"], []]
    named = PrototypePairs(names, ["a photo of a {c}."], hypernyms=broader, hypernym_form="name")
    assert [named.caption(i) for i in range(len(named))][-3:] == [
        "a photo of a trouser.",
        "a photo of a workwear.",
        "a photo of a shoe.",
    ]
    assert len(named) == 4 + 3 and named.classes()[-3:] == [0, 0, 1]  # a class without hypernyms adds none
    kind = PrototypePairs(names, ["a photo of a {c}.", "a {c}"], hypernyms=broader, hypernym_form="kind")
    assert [kind.caption(i) for i in range(len(kind))][-2:] == [
        "a photo of a sandal, a kind of shoe.",
        "a sandal, a kind of shoe",
    ]
    assert len(kind) == 4 * 2 + 3 * 2
    with pytest.raises(ConfigError, match="2 given for 3 classes"):
        PrototypePairs(names, hypernyms=broader[:2])
    with pytest.raises(ConfigError, match="must be one of name, kind"):
        PrototypePairs(names, hypernyms=broader, hypernym_form="sort")


def test_definitions_and_hypernyms_together_follow_the_names_in_that_order():
    names = [["jean", "blue jean"], ["sandal"]]
    source = PrototypePairs(
        names,
        ["a photo of a {c}."],
        definitions=["close-fitting trousers", "a shoe fastened by straps"],
        hypernyms=[["trouser"], ["shoe"]],
        hypernym_form="name",
    )
    assert [source.caption(i) for i in range(len(source))] == [
        "a photo of a jean.",
        "a photo of a blue jean.",
        "a photo of a sandal.",
        "a photo of a jean, close-fitting trousers.",
        "a photo of a sandal, a shoe fastened by straps.",
        "a photo of a trouser.",
        "a photo of a shoe.",
    ]
    assert source.classes() == [0, 0, 1, 0, 1, 0, 1]


def test_imagenet_hypernyms_come_from_wordnet_in_head_row_order(tmp_path):
    broader = read_hypernyms("imagenet-1k-both")
    assert len(broader) == 1000 and all(broader)  # every ImageNet class has a hypernym
    assert broader[608] == ["trouser", "workwear"] and broader[841] == ["pullover"] and broader[774] == ["shoe"]
    plain = open_prototypes(classnames="imagenet-1k")
    source = open_prototypes(classnames="imagenet-1k", hypernyms="name")
    assert len(source) == len(plain) + sum(len(b) for b in broader)
    assert source.caption(len(source) - 1) == "a photo of a tissue."  # toilet tissue, the last class
    kind = open_prototypes(classnames="imagenet-1k", hypernyms="kind")
    assert kind.caption(len(kind) - 1) == "a photo of a toilet tissue, a kind of tissue."
    assert len(open_prototypes(classnames="imagenet-1k", hypernyms=False)) == len(plain)
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    with pytest.raises(ConfigError, match="no WordNet synsets"):
        open_prototypes(classnames=str(names), hypernyms="name")
    with pytest.raises(ConfigError, match="prototype option hypernyms must be one of name, kind"):
        open_prototypes(hypernyms=True)


@pytest.fixture
def classnames(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("red, crimson\ngreen\nblue, azure, navy\n")
    return str(path)


def test_the_source_mixes_with_others_at_its_weight(classnames):
    spec = ["synthetic::0.75", {"source": "prototypes", "weight": 0.25, "options": {"classnames": classnames}}]
    mixture = open_mixture(spec)
    synthetic, prototypes = mixture.sources
    assert len(prototypes) == 6 and prototypes.caption(1) == "a photo of a crimson."
    assert mixture.weights == [0.75, 0.25]
    sampler = ResumableBatchSampler(mixture.layout(), batch_size=64, seed=0, num_steps=4, epoch_samples=256)
    drawn = [i for batch in sampler for i, _ in batch]
    assert sum(i >= len(synthetic) for i in drawn) == 64  # a quarter of the 256 samples of the epoch


@pytest.mark.parametrize("views", [1, 2])
def test_cached_features_serve_the_placed_rows(headed_model, classnames, tmp_path, views):
    path, head = headed_model
    model = lipkit.create_model(path)
    assert torch.equal(tower_head(model.visual), head)
    spec = ["synthetic:val::0.5", {"source": "prototypes", "weight": 0.5, "options": {"classnames": classnames}}]
    mixture = open_mixture(spec)
    images, prototypes = mixture.sources
    image, text = feature_cache.cached_features(
        model, mixture.concatenated(), tmp_path / "c", progress=False, views=views
    )
    n = len(images)
    assert image.shape[0] == len(text.features) == n + 6
    plain, plain_text = feature_cache.cached_features(model, images, tmp_path / "c", progress=False, views=views)
    assert torch.equal(image[:n], plain)  # the image sources keep the entry they have without prototypes
    assert torch.equal(text.features[:n], plain_text.features)
    reference = plain if views == 1 else plain[:, 0]
    placed = place(head, reference, Placement.parse("mean+3std"))[[0, 0, 1, 2, 2, 2]]
    assert torch.equal(image[n:] if views == 1 else image[n:, 1], placed)
    with torch.no_grad():
        tokens = lipkit.get_tokenizer(model.cfg)([prototypes.caption(i) for i in range(6)])
        assert torch.allclose(text.features[n:], model.text.features(tokens), atol=1e-6)
    assert sorted(p.name.startswith("text-") for p in (tmp_path / "c").glob("*.pt")) == [False] * views + [True]


def test_cached_training_runs_with_prototypes(headed_model, classnames, run_overrides, tmp_path):
    path, _ = headed_model
    spec = f"[synthetic:val::0.5, {{source: prototypes, weight: 0.5, options: {{classnames: {classnames}}}}}]"
    overrides = [*run_overrides, f"model={path}", "cache_features=true", f"feature_cache_dir={tmp_path / 'c'}"]
    cfg = resolve_config("tiny-synthetic", overrides=[*overrides, f"data.train={spec}", "steps=3", "log_every=1"])
    result = loop.train(cfg)
    assert result.step == 3 and result.checkpoint.is_file()
    unlocked = [*overrides[:-2], f"data.train={spec}", "name=unlocked", "model_overrides.lock_image=false"]
    with pytest.raises(ConfigError, match="prototype sources need a locked image tower"):
        loop.train(resolve_config("tiny-synthetic", overrides=unlocked))
    assert not (tmp_path / "unlocked").exists()  # refused before the run folder is made


def test_full_training_with_prototypes_equals_cached_training(headed_model, classnames, run_overrides, tmp_path):
    """Through the image trunk (no feature cache), a batch mixes images with placed head rows; with the
    evaluation view only (no augmentation), every step is the cached run's step."""
    path, _ = headed_model
    spec = f"[synthetic:val::0.5, {{source: prototypes, weight: 0.5, options: {{classnames: {classnames}}}}}]"
    common = [*run_overrides, f"model={path}", f"data.train={spec}", "steps=4", "log_every=1", "data.augment=false"]
    cached = loop.train(
        resolve_config(
            "tiny-synthetic",
            overrides=[*common, "name=cached", "cache_features=true", f"feature_cache_dir={tmp_path / 'c'}"],
        )
    )
    full = loop.train(resolve_config("tiny-synthetic", overrides=[*common, "name=full"]))
    assert not (tmp_path / "full" / "features").exists()
    want = [r[k] for r in read_metrics(cached.run_dir) for k in ("loss", "grad_norm")]
    got = [r[k] for r in read_metrics(full.run_dir) for k in ("loss", "grad_norm")]
    assert len(got) == 8 and got == pytest.approx(want, rel=1e-4)


def test_a_mixed_batch_runs_the_trunk_on_its_image_rows_only(headed_model):
    model = lipkit.create_model(headed_model[0]).eval()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        trunk = model.visual.features(images)
    given = torch.randn(3, trunk.shape[1])
    mask = torch.tensor([False, True, False])
    mixed = MixedImages(
        torch.where(mask[:, None, None, None], 0.0, images), torch.where(mask[:, None], given, 0.0), mask
    )
    calls = []
    features = model.visual.features
    model.visual.features = lambda x: calls.append(x.shape[0]) or features(x)
    with torch.no_grad():
        got = model.encode_image(mixed)
    assert calls == [2]
    expected = model.visual.proj(torch.stack([trunk[0], given[1], trunk[2]]))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    loader_batch = stack_images((images[0], FeaturePoint(given[1]), images[2]))
    assert torch.equal(loader_batch["from_features"], mask) and torch.equal(loader_batch["features"][1], given[1])
    assert torch.equal(loader_batch["pixels"][1], torch.zeros(3, 32, 32)) and torch.equal(
        loader_batch["pixels"][2], images[2]
    )


def test_clear_errors(headed_model, classnames, tmp_path):
    with pytest.raises(LipkitError, match="VisionTransformer has no classifier head"):
        tower_head(lipkit.create_model("micro").visual)
    bare = lipkit.create_model(headed_model[0], vision={"pretrained": None})
    with pytest.raises(LipkitError, match=r"no classifier head: vision\.pretrained is not set"):
        tower_head(bare.visual)
    two = PrototypePairs([["a"], ["b"]])
    with pytest.raises(LipkitError, match="head has 3 classes, the class names 'classes' 2"):
        two.features(headed_model[1], torch.zeros(4, headed_model[1].shape[1]))
    with pytest.raises(LipkitError, match=r"class name file 'missing\.txt' does not exist"):
        read_classnames("missing.txt")
    with pytest.raises(LipkitError, match="imagenet-1k"):
        read_classnames("imagenet1k")
    with pytest.raises(LipkitError, match="no held-out split"):
        open_mixture("prototypes:test")
    with pytest.raises(LipkitError, match=r"data source 'prototypes': .*'colour'"):
        open_mixture([{"source": "prototypes", "options": {"colour": "red", "classnames": classnames}}])
    with pytest.raises(LipkitError, match="options apply to registered sources only"):
        open_mixture([{"source": str(tmp_path), "options": {"placement": "norm"}}])

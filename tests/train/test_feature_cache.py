from __future__ import annotations

import pytest
import torch

from lipkit.errors import ConfigError
from lipkit.train import feature_cache, loop
from lipkit.train.config import resolve_config
from lipkit.train.metrics import read_metrics

LOCKED = ["model_overrides.lock_image=true", "model_overrides.lock_text=true", "cache_features=true"]


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
    trunk = torch.load(second.checkpoint, weights_only=False)["model"]["visual.patch_embed.weight"]
    assert torch.equal(trunk, torch.load(first.checkpoint, weights_only=False)["model"]["visual.patch_embed.weight"])


def test_cached_training_resumes_exactly(run_overrides, tmp_path):
    base = [*run_overrides, *LOCKED, f"feature_cache_dir={tmp_path / 'c'}", "steps=8", "log_every=1"]
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
    from lipkit.data.sources import SyntheticPairs

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


def test_feature_caching_needs_locked_towers(run_overrides):
    with pytest.raises(ConfigError, match="lock_image=true"):
        loop.train(resolve_config("tiny-synthetic", overrides=[*run_overrides, "cache_features=true"]))

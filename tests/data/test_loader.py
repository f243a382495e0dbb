from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lipkit.data.corpora import TUXPAINT_ROOT, SyntheticPairs, TuxPaintPairs
from lipkit.data.loader import ResumableBatchSampler, make_train_loader
from lipkit.data.pairs import split_of
from lipkit.data.spec import open_source
from lipkit.errors import LipkitError, UnknownNameError
from lipkit.models import get_tokenizer, image_transform


def test_split_of_is_stable_and_roughly_80_10_10():
    keys = [f"animals/bird{i}" for i in range(5000)]
    splits = [split_of(k) for k in keys]
    assert splits == [split_of(k) for k in keys]
    assert split_of("animals/birds/blackbird") == split_of("animals/birds/blackbird")
    frac = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.77 < frac["train"] < 0.83 and 0.08 < frac["val"] < 0.12 and 0.08 < frac["test"] < 0.12


def test_sampler_batches_are_a_function_of_the_step():
    sampler = ResumableBatchSampler(n=50, batch_size=8, seed=3)
    it = iter(sampler)
    first = [next(it) for _ in range(12)]
    resumed = list(ResumableBatchSampler(n=50, batch_size=8, seed=3, start_step=7, num_steps=5))
    assert resumed == first[7:]
    epoch0 = [i for batch in first[:6] for i, _ in batch]
    assert len(set(epoch0)) == 48  # no duplicates within an epoch
    assert first != list(ResumableBatchSampler(n=50, batch_size=8, seed=4, num_steps=12))
    with pytest.raises(LipkitError, match="fewer than one batch"):
        ResumableBatchSampler(n=4, batch_size=8, seed=0)


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_resume_gives_identical_batches(workers):
    source = SyntheticPairs(size=64, image_size=32)
    kwargs = dict(transform=image_transform("micro", train=True), tokenize=get_tokenizer("micro"), batch_size=8)
    full = list(make_train_loader(source, seed=1, num_steps=6, **kwargs))
    tail = list(make_train_loader(source, seed=1, start_step=4, num_steps=2, workers=workers, **kwargs))
    for (img_a, tok_a), (img_b, tok_b) in zip(full[4:], tail):
        assert torch.equal(img_a, img_b) and torch.equal(tok_a, tok_b)


def test_synthetic_pairs_are_deterministic_and_split():
    a, b = open_source("synthetic"), open_source("synthetic:val")
    assert a.caption(3) == SyntheticPairs().caption(3)
    assert list(a.image(3).getdata()) == list(SyntheticPairs().image(3).getdata())
    assert len(b) < len(a) and list(a.image(0).getdata()) != list(b.image(0).getdata())


def test_bad_source_specs():
    with pytest.raises(UnknownNameError, match="Did you mean: tuxpaint"):
        open_source("tuxpiant")
    with pytest.raises(LipkitError, match="split must be"):
        open_source("synthetic:dev")
    with pytest.raises(LipkitError, match="apt-get install tuxpaint-stamps-default"):
        TuxPaintPairs(root=Path("/nonexistent/stamps"))


@pytest.mark.skipif(not TUXPAINT_ROOT.is_dir(), reason="tuxpaint-stamps-default is not installed")
def test_tuxpaint_pairs_are_real_captioned_images():
    train, test = TuxPaintPairs("train"), TuxPaintPairs("test")
    assert len(train) > 500 and len(test) > 50
    assert not {p.key for p in train.pairs} & {p.key for p in test.pairs}
    caption = train.caption(0)
    assert caption and "\n" not in caption
    assert min(train.image(0).size) > 16

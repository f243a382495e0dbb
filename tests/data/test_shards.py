from __future__ import annotations

import functools
import io
import logging
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lipkit.data import shards as shard_module
from lipkit.data.corpora import SyntheticPairs
from lipkit.data.decode import draft_scale, open_image
from lipkit.data.files import folder_pairs
from lipkit.data.loader import ResumableBatchSampler, make_train_loader
from lipkit.data.order import BatchPlan, Layout, allocate, window_shuffle
from lipkit.data.shards import expand_braces, resolve_shards
from lipkit.data.spec import open_mixture, parse_spec, split_entries
from lipkit.errors import ConfigError, LipkitError
from lipkit.models import get_tokenizer, image_transform
from lipkit.train import loop
from lipkit.train.config import resolve_config
from lipkit.train.metrics import read_metrics


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPKIT_CACHE_DIR", str(tmp_path / "cache"))


def jpeg(seed: int, size: tuple[int, int] = (40, 32)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path: Path, keys: list[str], bad: tuple[str, ...] = ()) -> None:
    """A webdataset tar; the images of ``bad`` keys are garbage."""
    with tarfile.open(path, "w") as tar:
        for i, key in enumerate(keys):
            for ext, data in (("jpg", b"garbage" if key in bad else jpeg(i)), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shard_dir(tmp_path) -> Path:
    """Four shards of ten samples: keys s{shard}_{i}."""
    root = tmp_path / "shards"
    root.mkdir()
    for s in range(4):
        write_shard(root / f"{s:05d}.tar", [f"s{s}_{i}" for i in range(10)])
    return root


@functools.cache
def transform_and_tokenizer():
    return image_transform("micro", train=True), get_tokenizer("micro")


def loader_kwargs(**extra):
    transform, tokenize = transform_and_tokenizer()
    return {"transform": transform, "tokenize": tokenize, "batch_size": 8, **extra}


def test_brace_expansion_and_patterns_that_match_nothing(shard_dir):
    assert expand_braces("a/{000..003}.tar") == [f"a/{i:03d}.tar" for i in range(4)]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert expand_braces("x{1,{y,z}}") == ["x1", "xy", "xz"] and expand_braces("{3..1}") == ["3", "2", "1"]
    assert len(resolve_shards(f"{shard_dir}/{{00000..00003}}.tar")) == 4
    assert len(resolve_shards(f"{shard_dir}/*.tar")) == 4
    with pytest.raises(LipkitError, match=r"no shards match '/nowhere/\{0..9\}.tar'"):
        resolve_shards("/nowhere/{0..9}.tar")
    with pytest.raises(LipkitError, match=r"1 of the shards named by .* do not exist"):
        resolve_shards(f"{shard_dir}/{{00000..00004}}.tar")
    with pytest.raises(LipkitError, match="no shards match"):
        open_mixture(f"{shard_dir}/missing-*.tar")


def test_shards_read_at_random_and_the_index_is_cached(shard_dir, monkeypatch):
    source = open_mixture(str(shard_dir)).sources[0]
    assert len(source) == 40 and list(source.groups()) == [0, 10, 20, 30, 40]
    assert (source.key(23), source.caption(23)) == ("s2_3", "caption s2_3")
    assert source.image(23).size == (40, 32)
    monkeypatch.setattr(shard_module, "index_tar", lambda path: pytest.fail("re-indexed an unchanged shard"))
    assert len(open_mixture(f"{shard_dir}/{{00000..00003}}.tar").sources[0]) == 40
    write_shard(shard_dir / "00001.tar", ["new"])
    monkeypatch.undo()
    assert len(open_mixture(str(shard_dir)).sources[0]) == 31  # a changed shard is indexed again


def test_truncated_tar_is_counted_and_its_complete_samples_kept(shard_dir):
    path = shard_dir / "00003.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.warns(UserWarning, match="1 truncated shard"):
        mixture = open_mixture(str(shard_dir))
    source = mixture.sources[0]
    assert 32 <= len(source) < 40 and mixture.skipped["truncated_shards"] == 1
    assert all(source.image(i).size == (40, 32) for i in range(len(source)))
    loader = make_train_loader(mixture, seed=0, num_steps=2, **loader_kwargs())
    assert loader.stats.lost["truncated_shards"] == 1
    with pytest.raises(LipkitError, match="not an uncompressed tar"):
        (shard_dir / "zipped.tar").write_bytes(b"\x1f\x8b" + bytes(600))
        open_mixture(str(shard_dir / "zipped.tar"))


def test_shards_take_the_packed_image_formats_and_folders_take_more(tmp_path):
    """A shard sample needs a jpg, jpeg, png or webp member (the first of them, in that order); a folder
    listing also takes the other formats Pillow reads, such as GIF."""
    gif = io.BytesIO()
    Image.new("RGB", (8, 8), (0, 255, 0)).save(gif, "GIF")
    members = {"a.PNG": jpeg(1, (16, 16)), "a.jpg": jpeg(0), "a.txt": b"two images", "b.gif": gif.getvalue()}
    members |= {"b.txt": b"only a gif", "c/d.webp": jpeg(2, (24, 24)), "c/d.json": b'{"caption": "in a folder"}'}
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.warns(UserWarning, match="skipped 1 samples"):
        source = open_mixture(str(tmp_path / "00000.tar")).sources[0]
    assert [source.key(i) for i in range(len(source))] == ["a", "c/d"]
    assert source.image(0).size == (40, 32) and source.caption(1) == "in a folder"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.gif").write_bytes(gif.getvalue())
    (folder / "b.txt").write_text("only a gif")
    assert [p.key for p in folder_pairs(folder)] == ["b.gif"]


def test_undecodable_images_are_replaced_deterministically_and_counted(tmp_path, caplog):
    write_shard(tmp_path / "a.tar", [f"k{i}" for i in range(16)], bad=("k3", "k11"))
    mixture = open_mixture(str(tmp_path / "a.tar"))
    runs, counts = [], []
    for workers in (0, 2):
        loader = make_train_loader(mixture, seed=1, num_steps=4, workers=workers, **loader_kwargs())
        with caplog.at_level(logging.WARNING, logger="lipkit.data"):
            runs.append([(b["keys"], b["images"]) for b in loader.batches()])
        # 2 bad samples x 2 epochs, plus any replacement that drew a bad sample again
        assert set(loader.stats.replaced) == {"undecodable_image"} and loader.stats.replaced["undecodable_image"] >= 4
        counts.append(loader.stats.replaced["undecodable_image"])
    assert counts[0] == counts[1] and f"replaced {counts[0]} samples (undecodable_image {counts[0]})" in caplog.text
    keys = [k for batch, _ in runs[0] for k in batch]
    assert "k3" not in keys and "k11" not in keys
    for (keys_a, img_a), (keys_b, img_b) in zip(*runs):
        assert keys_a == keys_b and torch.equal(img_a, img_b)


def test_resume_is_exact_for_any_worker_count(shard_dir):
    mixture = open_mixture(f"{shard_dir}/{{00000..00003}}.tar")
    full = list(make_train_loader(mixture, seed=5, num_steps=8, **loader_kwargs()).batches())
    epoch0 = [k for b in full[:5] for k in b["keys"]]
    assert sorted(epoch0) == sorted(f"s{s}_{i}" for s in range(4) for i in range(10))  # each sample once
    for workers in (0, 2):
        tail = list(make_train_loader(mixture, seed=5, start_step=3, num_steps=5, workers=workers, **loader_kwargs()))
        for b, (images, tokens) in zip(full[3:], tail):
            assert torch.equal(b["images"], images) and torch.equal(b["tokens"], tokens)
    two = list(make_train_loader(mixture, seed=5, num_steps=3, workers=2, **loader_kwargs()).batches())
    rest = list(make_train_loader(mixture, seed=5, start_step=3, num_steps=5, workers=0, **loader_kwargs()).batches())
    assert [b["keys"] for b in two + rest] == [b["keys"] for b in full]
    assert all(torch.equal(a["images"], b["images"]) for a, b in zip(two + rest, full))


def test_shard_windows_keep_reads_local():
    bounds = np.arange(0, 81, 10)  # 8 shards of 10
    order = window_shuffle(80, bounds, 2, np.random.default_rng(0))
    assert sorted(order) == list(range(80))
    for w in range(4):
        assert len({int(i) // 10 for i in order[w * 20 : (w + 1) * 20]}) == 2  # each window: two whole shards
    assert not np.array_equal(order, window_shuffle(80, bounds, 2, np.random.default_rng(1)))


def test_mixing_weights_give_exact_shares_without_repeats():
    spec = "synthetic::0.75,synthetic:val::0.25"
    mixture = open_mixture(spec)
    assert mixture.weights == [0.75, 0.25] and [len(s) for s in mixture.sources] == [4096, 512]
    plan = BatchPlan(mixture.layout(), batch_size=16, seed=0, epoch_samples=320)
    epoch = np.concatenate([plan.indices(s) for s in range(plan.steps_per_epoch)])
    assert (epoch < 4096).sum() == 240 and (epoch >= 4096).sum() == 80
    assert len(set(epoch.tolist())) == 320
    assert not np.array_equal(epoch, np.concatenate([plan.indices(s) for s in range(20, 40)]))
    assert list(allocate(7, (0.5, 0.25, 0.25))) == [3, 2, 2]  # 3.5, 1.75, 1.75: largest remainders first
    small = BatchPlan(Layout((100, 3), (0.5, 0.5), (None, None)), batch_size=10, seed=0, epoch_samples=20)
    second = np.concatenate([small.indices(0), small.indices(1)])
    assert Counter((second >= 100).tolist())[True] == 10  # a small source cycles through fresh permutations


def test_resampled_mode_draws_with_replacement_by_weight():
    layout = Layout((50, 50), (0.9, 0.1), (None, None))
    plan = BatchPlan(layout, batch_size=100, seed=3, resampled=True)
    draws = np.concatenate([plan.indices(s) for s in range(20)])
    assert np.array_equal(plan.indices(7), BatchPlan(layout, 100, 3, resampled=True).indices(7))
    assert 0.85 < (draws < 50).mean() < 0.95 and len(set(plan.indices(0).tolist())) < 100


def test_ranks_take_their_slice_of_each_global_batch():
    parts = [ResumableBatchSampler(64, 8, seed=2, rank=r, world_size=4).batch(5) for r in range(4)]
    assert [x for p in parts for x in p] == ResumableBatchSampler(64, 8, seed=2).batch(5)
    assert all(len(p) == 2 for p in parts)
    with pytest.raises(ConfigError, match="does not split evenly"):
        ResumableBatchSampler(64, 6, seed=0, world_size=4)


def test_epoch_samples_sets_the_epoch_length():
    plan = BatchPlan(Layout.single(100), batch_size=10, seed=0, epoch_samples=30)
    assert plan.steps_per_epoch == 3
    first = np.concatenate([plan.indices(s) for s in range(3)])
    assert len(set(first.tolist())) == 30 and not np.array_equal(first, plan.indices(3)[:10])


def test_spec_syntax():
    assert split_entries("a/{0,1}.tar,b:train") == ["a/{0,1}.tar", "b:train"]
    entries = parse_spec(["x/{0..9}.tar::0.7", {"source": "t.csv", "weight": 0.3, "caption_col": "title"}])
    assert [(e.source, e.weight) for e in entries] == [("x/{0..9}.tar", 0.7), ("t.csv", 0.3)]
    assert entries[1].caption_col == "title"
    for bad, message in [
        ("a::0.5,b", "give every source a weight"),
        ("a::heavy", "not a number"),
        ("a::-1", "must be positive"),
        ("a,,b", "empty entry"),
        ([{"source": "a", "wieght": 1}], "Did you mean: weight"),
    ]:
        with pytest.raises(LipkitError, match=message):
            parse_spec(bad)
    with pytest.raises(ConfigError, match=r"data\.train"):
        resolve_config(overrides=["data.train=a::0.5,b"])


def test_draft_decoding_picks_the_smallest_scale_that_still_covers_the_target():
    data = jpeg(0, (1000, 800))
    assert draft_scale((1000, 800), (224, 224)) == 2 and open_image(data, (224, 224)).size == (500, 400)
    assert draft_scale((1000, 800), (100, 100)) == 8 and open_image(data, (100, 100)).size == (125, 100)
    assert draft_scale((1000, 800), (500, 500)) == 1 and open_image(data, (500, 500)).size == (1000, 800)
    assert open_image(data).size == (1000, 800)
    buf = io.BytesIO()
    Image.new("RGB", (1000, 800)).save(buf, "PNG")
    assert open_image(buf.getvalue(), (100, 100)).size == (1000, 800)  # only JPEGs have DCT scales


def test_training_on_shards(shard_dir, run_overrides):
    overrides = [*run_overrides, f"data.train={shard_dir}/{{00000..00003}}.tar", "steps=3", "data.batch_size=8"]
    result = loop.train(resolve_config("tiny-synthetic", overrides=[*overrides, "log_every=1"]))
    assert result.step == 3 and len(read_metrics(result.run_dir)) == 3
    mixed = f"data.train={shard_dir}::0.5,synthetic::0.5"
    assert loop.train(resolve_config("tiny-synthetic", overrides=[*overrides, mixed, "name=mixed"])).step == 3


def test_synthetic_keys_and_concatenated_sources():
    source = open_mixture("synthetic,synthetic:val").as_source()
    assert len(source) == 4096 + 512 and source.key(4096) == SyntheticPairs(offset=10**6).key(0)
    with pytest.raises(LipkitError, match="weighted mixture"):
        open_mixture("synthetic::1,synthetic:val::1").as_source()


def test_an_unwritable_index_cache_only_costs_reindexing(shard_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("x")
    monkeypatch.setenv("LIPKIT_CACHE_DIR", str(blocker / "cache"))  # a folder under a file cannot be made
    pairs = open_mixture(f"{shard_dir}/{{00000..00003}}.tar").concatenated()
    assert len(pairs) == 40
    assert pairs.caption(0) == "caption s0_0"

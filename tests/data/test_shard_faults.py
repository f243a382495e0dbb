"""Damaged shards: corrupt headers, flipped bytes and truncations lose only the samples they touch, and
every lost sample is counted.

A written sample is *lost* when the reader does not serve its key. With the stats file that ``lipkit data
pack`` writes beside each shard, the reader's ``incomplete_samples + corrupt_samples`` must equal the
number of lost samples exactly. A served sample must be read from the members it was written to: its
image and caption bytes are the written ones unless a flipped byte lies inside them (then the image may
fail to decode, which the loader replaces and counts, or the caption may differ).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lipkit.cli.main import main
from lipkit.data.decode import UndecodableImage, UnreadableCaption, open_image
from lipkit.data.loader import make_train_loader
from lipkit.data.pack import PackOptions, file_items, pack
from lipkit.data.shards import ShardPairs, index_tar
from lipkit.data.spec import open_mixture
from lipkit.errors import LipkitError
from lipkit.models import get_tokenizer, image_transform
from lipkit.train import loop
from lipkit.train.config import resolve_config

SAMPLES, PER_SHARD = 24, 8
FUZZ_EXAMPLES = int(os.environ.get("LIPKIT_FUZZ_EXAMPLES", "100"))  # damaged shard sets per run
TALLY = {"shard sets": 0, "samples lost": 0, "counted": 0}  # printed at the end of the module (pytest -s)


@pytest.fixture(scope="module", autouse=True)
def _index_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LIPKIT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield
    if TALLY["shard sets"]:
        print("\nfuzzed shards: " + ", ".join(f"{k} {v}" for k, v in TALLY.items()))


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """Three shards of eight samples packed by lipkit, with their stats files: captions ``picture N``."""
    root = tmp_path_factory.mktemp("packed")
    (root / "src").mkdir()
    rng = np.random.default_rng(0)
    for i in range(SAMPLES):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / "src" / f"img{i:02d}.jpg")
        (root / "src" / f"img{i:02d}.txt").write_text(f"picture {i}")
    pack(file_items(root / "src"), root / "shards", PackOptions(samples_per_shard=PER_SHARD), progress=False)
    return root / "shards"


@dataclass
class Written:
    """What one shard holds as written: each member's (data offset, size), by (key, extension)."""

    data: bytes
    members: dict[tuple[str, str], tuple[int, int]]

    @classmethod
    def read(cls, path: Path) -> Written:
        with tarfile.open(path) as tar:
            members = {tuple(m.name.split(".", 1)): (m.offset_data, m.size) for m in tar}
        return cls(path.read_bytes(), members)

    def keys(self) -> set[str]:
        return {key for key, _ in self.members}


def copy_shards(packed: Path, to: Path) -> Path:
    shutil.copytree(packed, to)
    return to


def damage(path: Path, flips: list[tuple[int, int]] = (), cut: int | None = None) -> None:
    """XOR the byte at each position with its mask, then keep the first ``cut`` bytes."""
    data = bytearray(path.read_bytes())
    for position, mask in flips:
        data[position] ^= mask
    path.write_bytes(bytes(data[:cut]))


def open_quietly(paths: list[Path]) -> ShardPairs:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ShardPairs(paths, "fuzzed")


def lost_and_counted(source: ShardPairs, written: list[Written]) -> tuple[int, int]:
    """Samples written but not served, and the reader's count of lost samples."""
    served = {source.key(i) for i in range(len(source))}
    every = set().union(*(w.keys() for w in written))
    assert served <= every
    counted = source.skipped["incomplete_samples"] + source.skipped["corrupt_samples"]
    return len(every - served), counted


def touched(flips: list[tuple[int, int]], location: np.ndarray) -> bool:
    offset, size = (int(v) for v in location)
    return any(offset <= position < offset + size for position, _ in flips)


def check_served(source: ShardPairs, written: list[Written], flips: list[list[tuple[int, int]]]) -> int:
    """Every served sample comes from its written members, intact unless flipped; returns undecodable images."""
    undecodable = 0
    for i in range(len(source)):
        shard, key = int(source.shard_of[i]), source.key(i)
        members, shard_flips = written[shard].members, flips[shard]
        assert tuple(source.image_loc[i]) == members[(key, "jpg")]
        assert tuple(source.text_loc[i]) == members[(key, "json" if source.text_is_json[i] else "txt")]
        try:
            image = np.asarray(source.image(i))
        except UndecodableImage:
            assert touched(shard_flips, source.image_loc[i])
            undecodable += 1
        else:
            if not touched(shard_flips, source.image_loc[i]):
                offset, size = members[(key, "jpg")]
                assert np.array_equal(image, np.asarray(open_image(written[shard].data[offset : offset + size])))
        try:
            caption = source.caption(i)
        except UnreadableCaption:
            assert source.text_is_json[i] and touched(shard_flips, source.text_loc[i])
        else:
            assert caption == f"picture {shard * PER_SHARD + int(key[-1])}" or touched(shard_flips, source.text_loc[i])
    return undecodable


def fuzz_once(packed: Path, draw: st.DataObject) -> tuple[int, int, int]:
    """Damage shards 1 and 2 (shard 0 stays whole, so the source always opens), read everything back.

    Returns:
        Samples lost, samples counted as lost, images served that do not decode.
    """
    with tempfile.TemporaryDirectory() as tmp:
        root = copy_shards(packed, Path(tmp) / "shards")
        paths = sorted(root.glob("*.tar"))
        written = [Written.read(p) for p in paths]
        flips: list[list[tuple[int, int]]] = [[]]
        for path, w in zip(paths[1:], written[1:]):
            size = len(w.data)
            flips.append(draw.draw(st.lists(st.tuples(st.integers(0, size - 1), st.integers(1, 255)), max_size=8)))
            damage(path, flips[-1], draw.draw(st.none() | st.integers(0, size)))
        source = open_quietly(paths)
        lost, counted = lost_and_counted(source, written)
        return lost, counted, check_served(source, written, flips)


@pytest.mark.slow
@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(draw=st.data())
def test_fuzzed_shards_are_read_without_a_crash_and_every_lost_sample_is_counted(packed, draw):
    lost, counted, _ = fuzz_once(packed, draw)
    assert counted == lost
    TALLY["shard sets"] += 1
    TALLY["samples lost"] += lost
    TALLY["counted"] += counted


def test_a_corrupt_first_header_loses_only_its_member(packed, tmp_path):
    root = copy_shards(packed, tmp_path / "shards")
    damage(root / "00001.tar", [(0, 0x01)])  # the name of the first member, 000010.jpg
    with pytest.warns(UserWarning, match=r"1 shard\(s\) with corrupt tar headers.*skipped 1 samples without an image"):
        mixture = open_mixture(str(root))
    source = mixture.sources[0]
    keys = [source.key(i) for i in range(len(source))]
    assert len(keys) == SAMPLES - 1 and "000010" not in keys and "000011" in keys
    assert mixture.skipped == {
        "incomplete_samples": 1,
        "corrupt_samples": 0,
        "truncated_shards": 0,
        "corrupt_shards": 1,
    }
    assert [source.caption(i) for i in range(len(source))] == [f"picture {i}" for i in range(SAMPLES) if i != 8]
    transform, tokenize = image_transform("micro", train=True), get_tokenizer("micro")
    loader = make_train_loader(mixture, transform, tokenize, batch_size=8, seed=0, num_steps=1)
    assert "lost when opening: corrupt_shards 1, incomplete_samples 1" in loader.stats.summary()


def test_a_sample_lost_whole_is_counted_from_the_stats_file(packed, tmp_path):
    root = copy_shards(packed, tmp_path / "shards")
    written = Written.read(root / "00002.tar")
    headers = [written.members[("000021", ext)][0] - 512 for ext in ("jpg", "txt", "json")]
    damage(root / "00002.tar", [(h + 3, 0x40) for h in headers])
    source = open_quietly([root / f"{s:05d}.tar" for s in range(3)])
    assert len(source) == SAMPLES - 1 and source.skipped["corrupt_samples"] == 1
    assert source.skipped["incomplete_samples"] == 0 and source.skipped["corrupt_shards"] == 1
    assert open_quietly([root / f"{s:05d}.tar" for s in range(3)]).skipped == source.skipped  # from the cache
    (root / "00002_stats.json").unlink()
    (root / "00002.tar").touch()  # a new modification time: indexed again
    with pytest.warns(UserWarning, match=r"1 damaged shard\(s\) have no stats file: .* only those named by a legible"):
        without_stats = ShardPairs([root / f"{s:05d}.tar" for s in range(3)], "shards")
    # the three headers still name one sample (000p21): counted from the names legible in corrupt headers
    assert len(without_stats) == SAMPLES - 1 and without_stats.skipped["corrupt_samples"] == 1


@pytest.mark.parametrize(
    ("position", "mask", "counted"),
    [(148, 0x01, 1), (3, 0x80, 0)],  # a flipped checksum leaves the name legible; a non-UTF-8 name does not
    ids=["legible-name", "illegible-name"],
)
def test_without_a_stats_file_samples_lost_whole_are_counted_from_legible_names(
    packed, tmp_path, position, mask, counted
):
    root = copy_shards(packed, tmp_path / "shards")
    written = Written.read(root / "00001.tar")
    headers = [written.members[(key, ext)][0] - 512 for key in ("000012", "000013") for ext in ("jpg", "txt", "json")]
    damage(root / "00001.tar", [(h + position, mask) for h in headers])
    (root / "00001_stats.json").unlink()
    source = open_quietly([root / f"{s:05d}.tar" for s in range(3)])
    assert len(source) == SAMPLES - 2
    assert source.skipped["corrupt_samples"] == 2 * counted and source.skipped["incomplete_samples"] == 0


def test_a_truncated_shard_counts_every_sample_after_the_cut(packed, tmp_path, capsys):
    root = copy_shards(packed, tmp_path / "shards")
    written = Written.read(root / "00002.tar")
    damage(root / "00002.tar", cut=written.members[("000023", "txt")][0] + 2)  # inside sample 3's caption
    source = open_quietly(sorted(root.glob("*.tar")))
    assert [source.key(i) for i in range(16, len(source))] == ["000020", "000021", "000022"]
    assert source.skipped == {"incomplete_samples": 1, "corrupt_samples": 4, "truncated_shards": 1, "corrupt_shards": 0}
    assert main(["data", "info", str(root), "--show", "0"]) == 0
    assert "19 pairs, 3 shards, weight 1.000; lost: incomplete_samples 1, corrupt_samples 4, truncated_shards 1" in (
        capsys.readouterr().out
    )


def test_only_compressed_files_and_files_without_a_tar_header_are_refused(packed, tmp_path):
    (tmp_path / "a.tar.gz").write_bytes(gzip.compress((packed / "00000.tar").read_bytes()))
    with pytest.raises(LipkitError, match=r"a.tar.gz is not an uncompressed tar \(gzip data\); .*decompress them"):
        index_tar(tmp_path / "a.tar.gz")
    (tmp_path / "noise.tar").write_bytes(np.random.default_rng(0).integers(0, 255, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(LipkitError, match=r"noise.tar is not an uncompressed tar \(no block of it is a tar header\)"):
        index_tar(tmp_path / "noise.tar")
    with tarfile.open(tmp_path / "bz.tar", "w") as tar:  # a member name that starts like bzip2 data
        for name, payload in (("BZh9.jpg", (packed / "00000.tar").read_bytes()[512:1024]), ("BZh9.txt", b"x")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    assert [bytes(k) for k in index_tar(tmp_path / "bz.tar").keys] == [b"BZh9"]
    root = copy_shards(packed, tmp_path / "shards")  # a shard cut to its first header, name and magic flipped:
    damage(root / "00002.tar", [(0, 0x01), (257, 0x01)], cut=512)  # its stats file says it is a shard
    index = index_tar(root / "00002.tar")
    assert (len(index), index.corrupt, index.damaged, index.truncated) == (0, PER_SHARD, 1, True)


@pytest.mark.slow
def test_training_reports_lost_samples_in_its_summary(packed, tmp_path, run_overrides):
    root = copy_shards(packed, tmp_path / "shards")
    written = Written.read(root / "00001.tar")
    # Sample 000012 loses its three headers (lost whole), sample 000015 its image header (left incomplete).
    broken = (("000012", "jpg"), ("000012", "txt"), ("000012", "json"), ("000015", "jpg"))
    damage(root / "00001.tar", [(written.members[member][0] - 512, 0x01) for member in broken])
    overrides = [*run_overrides, f"data.train={root}", "data.batch_size=4", "steps=2"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = loop.train(resolve_config("tiny-synthetic", overrides=overrides))
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert summary["data"]["lost"] == {
        "incomplete_samples": 1,
        "corrupt_samples": 1,
        "truncated_shards": 0,
        "corrupt_shards": 1,
    }
    assert summary["data"]["caption_fallbacks"] == 0
    assert "lost when opening: corrupt_samples 1, corrupt_shards 1, incomplete_samples 1" in result.data_summary

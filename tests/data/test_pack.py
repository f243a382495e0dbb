from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lipkit.cli.main import main
from lipkit.data import pack as packing
from lipkit.data.builtin import OPENCLIPART_SVG, svg_metadata
from lipkit.data.corpora import EMOJI_FONT, TUXPAINT_ROOT
from lipkit.data.pack import PackOptions, file_items, pack, sample_key
from lipkit.data.pairs import split_of
from lipkit.data.spec import open_mixture, open_source
from lipkit.errors import LipkitError


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPKIT_CACHE_DIR", str(tmp_path / "cache"))


def make_folder(root: Path, n: int = 12, size: tuple[int, int] = (64, 48)) -> Path:
    """``n`` JPEGs with .txt captions (every third one has a .json caption instead)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"img{i:03d}.jpg")
        if i % 3 == 2:
            (root / f"img{i:03d}.json").write_text(json.dumps({"caption": f"picture {i}"}))
        else:
            (root / f"img{i:03d}.txt").write_text(f"picture {i}\n")
    return root


def members(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return tar.getnames()


def test_pack_folder_writes_img2dataset_layout(tmp_path):
    src = make_folder(tmp_path / "src", n=12, size=(300, 200))
    result = pack(file_items(src), tmp_path / "out", PackOptions(samples_per_shard=5, max_side=100), progress=False)
    assert (result.shards, result.successes, result.failures) == (3, 12, {})
    out = tmp_path / "out"
    names = [".lock", *(f"0000{i}{s}" for i in range(3) for s in (".tar", "_stats.json"))]  # .lock: the folder lock
    assert sorted(p.name for p in out.iterdir()) == names
    assert members(out / "00001.tar")[:3] == ["000010.jpg", "000010.txt", "000010.json"]
    stats = json.loads((out / "00000_stats.json").read_text())
    assert stats["count"] == 5 and stats["successes"] == 5 and stats["failures"] == {}
    assert stats["width"]["max"] == 100 and stats["height"]["max"] == 67
    with tarfile.open(out / "00000.tar") as tar:
        meta = json.loads(tar.extractfile("000002.json").read())
        assert tar.extractfile("000002.txt").read() == b"picture 2"  # the caption from the .json sidecar
    assert (meta["source"], meta["width"], meta["original_width"]) == ("img002.jpg", 100, 300)
    assert sample_key(3, 7, 10_000) == "000030007"


def test_corrupt_images_and_missing_captions_are_counted_not_fatal(tmp_path):
    src = make_folder(tmp_path / "src", n=6)
    (src / "img001.jpg").write_bytes(b"not a jpeg")
    (src / "img003.txt").unlink()
    data = (src / "img004.jpg").read_bytes()
    (src / "img004.jpg").write_bytes(data[: len(data) // 2])  # truncated
    result = pack(file_items(src), tmp_path / "out", PackOptions(samples_per_shard=10), progress=False)
    assert result.successes == 3 and result.failures == {"missing_caption": 1, "undecodable_image": 2}
    keys = {name.split(".")[0] for name in members(tmp_path / "out" / "00000.tar")}
    assert keys == {"000000", "000002", "000005"}  # failed items leave gaps; the others keep their keys


def test_rerun_skips_finished_shards_and_a_crash_leaves_no_partial_shard(tmp_path, monkeypatch):
    src, out = make_folder(tmp_path / "src", n=12), tmp_path / "out"
    real = packing.encode_item

    def crash_in_shard_2(item, key, options):
        if key.startswith("00002"):
            raise RuntimeError("power cut")
        return real(item, key, options)

    monkeypatch.setattr(packing, "encode_item", crash_in_shard_2)
    with pytest.raises(RuntimeError, match="power cut"):
        pack(file_items(src), out, PackOptions(samples_per_shard=4), progress=False)
    finished = [".lock", "00000.tar", "00000_stats.json", "00001.tar", "00001_stats.json"]
    assert sorted(p.name for p in out.iterdir()) == finished
    before = (out / "00000.tar").stat().st_mtime_ns
    (out / ".00002.tar.killed.tmp").write_bytes(b"left by a killed run")
    monkeypatch.setattr(packing, "encode_item", real)
    again = pack(file_items(src), out, PackOptions(samples_per_shard=4), progress=False)
    assert (again.shards, again.written, again.successes) == (3, 1, 12)
    assert (out / "00000.tar").stat().st_mtime_ns == before
    assert not list(out.glob(".*.tmp"))
    with pytest.raises(LipkitError, match="samples_per_shard"):
        pack(file_items(src), out, PackOptions(samples_per_shard=5), progress=False)


def test_pack_with_worker_processes_matches_one_process(tmp_path):
    src = make_folder(tmp_path / "src", n=9)
    pack(file_items(src), tmp_path / "a", PackOptions(samples_per_shard=3, max_side=32), progress=False)
    pack(file_items(src), tmp_path / "b", PackOptions(samples_per_shard=3, max_side=32, workers=2), progress=False)
    for shard in ("00000.tar", "00001.tar", "00002.tar"):
        assert (tmp_path / "a" / shard).read_bytes() == (tmp_path / "b" / shard).read_bytes()


def test_pack_from_csv_and_its_column_errors(tmp_path):
    make_folder(tmp_path / "imgs", n=4)
    table = tmp_path / "pairs.csv"
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filepath", "title", "score"])
        writer.writerows([[f"imgs/img{i:03d}.jpg", f"row {i}" if i != 2 else "", 0.5] for i in range(4)])
    result = pack(file_items(table), tmp_path / "out", PackOptions(), progress=False)
    assert result.successes == 3 and result.failures == {"missing_caption": 1}
    with pytest.raises(LipkitError, match=r"no caption column 'alt'; its columns are: filepath, title, score"):
        file_items(table, caption_col="alt")
    (tmp_path / "bad.csv").write_text("path,label\nimgs/img000.jpg,1\n")
    with pytest.raises(LipkitError, match=r"no caption column .*its columns are: path, label"):
        file_items(tmp_path / "bad.csv")
    assert len(open_source(str(table))) == 3  # tables are training sources too


def test_pack_from_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    make_folder(tmp_path / "imgs", n=3)
    paths = [str(tmp_path / "imgs" / f"img{i:03d}.jpg") for i in range(3)]  # absolute paths work too
    pq.write_table(pa.table({"image": paths, "caption": ["a", "b", "c"]}), tmp_path / "pairs.parquet")
    result = pack(file_items(tmp_path / "pairs.parquet"), tmp_path / "out", PackOptions(), progress=False)
    assert result.successes == 3


def test_cli_pack_and_info(tmp_path, capsys):
    src = make_folder(tmp_path / "src", n=6)
    out = tmp_path / "out"
    assert main(["data", "pack", str(src), "--out-dir", str(out), "--samples-per-shard", "4", "--quiet"]) == 0
    assert "6 of 6 pairs in 2 shards" in capsys.readouterr().out
    assert main(["data", "info", f"{out}/{{00000..00001}}.tar"]) == 0
    assert "6 pairs, 2 shards" in capsys.readouterr().out
    assert main(["data", "pack", str(tmp_path / "missing"), "--out-dir", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.skipif(not TUXPAINT_ROOT.is_dir(), reason="tuxpaint-stamps-default is not installed")
def test_builtin_tuxpaint_keeps_every_translation(tmp_path):
    out = tmp_path / "tux"
    assert main(["data", "builtin", "tuxpaint", "--out-dir", str(out), "--limit", "30", "--quiet"]) == 0
    train = open_mixture(str(out / "train")).sources[0]
    assert 15 < len(train) <= 30
    with tarfile.open(out / "train" / "00000.tar") as tar:
        meta = json.loads(tar.extractfile(tar.getnames()[2]).read())
    assert meta["caption"] == meta["captions"]["en"] and len(meta["captions"]) > 20
    assert split_of(meta["source"]) == "train"
    assert json.loads((out / "corpus.json").read_text())["items"] == 30


@pytest.mark.skipif(not EMOJI_FONT.is_file(), reason="fonts-noto-color-emoji is not installed")
def test_builtin_emoji_and_the_emoji_source(tmp_path):
    out = tmp_path / "emoji"
    assert main(["data", "builtin", "emoji", "--out-dir", str(out), "--limit", "20", "--quiet"]) == 0
    shards = open_mixture(str(out / "train")).sources[0]
    assert len(shards) >= 10 and shards.image(0).size == (136, 128)
    source = open_source("emoji:val")
    assert 80 < len(source) < 200 and source.key(0).startswith("emoji/")
    assert source.image(0).mode == "RGBA" and source.caption(0) == source.caption(0).lower()
    every = open_source("emoji:all")
    assert "dog face" in {every.caption(i) for i in range(len(every))}


@pytest.mark.skipif(not OPENCLIPART_SVG.is_dir(), reason="openclipart-svg is not installed")
def test_builtin_openclipart_reads_titles_and_tags(tmp_path):
    pytest.importorskip("cairosvg")
    svg = next(OPENCLIPART_SVG.rglob("*.svg"))
    title, _, tags = svg_metadata(svg)
    assert title and isinstance(tags, list)
    out = tmp_path / "clipart"
    args = ["data", "builtin", "openclipart", "--out-dir", str(out), "--limit", "8", "--max-side", "64", "--quiet"]
    assert main(args) == 0
    stats = json.loads((out / "train" / "00000_stats.json").read_text())
    assert stats["successes"] >= 3 and stats["width"]["max"] <= 64


def test_builtin_labelled_set_in_clip_benchmark_layout(tmp_path):
    labelled = pytest.importorskip("lipkit.data.labelled")
    try:
        labelled.open_labelled("fashion-mnist:test")
    except LipkitError:
        pytest.skip("dataset-fashion-mnist is not installed")
    out = tmp_path / "wds_fashion-mnist"
    assert main(["data", "builtin", "fashion-mnist", "--out-dir", str(out), "--limit", "40", "--quiet"]) == 0
    assert (out / "test" / "nshards.txt").read_text().strip() == "1"
    assert members(out / "test" / "0.tar")[:3] == ["s0000000.png", "s0000000.cls", "s0000000.txt"]
    data = labelled.open_labelled(f"wds:{out}:test")
    assert len(data) == 40 and data.classnames[9] == "ankle boot" and "{c}" in data.templates[0]

"""Captions read from files are decoded as UTF-8, else Windows-1252 (else Latin-1), and the fallbacks are
counted and warned about once, wherever captions are read: folders, tables, shards and Tux Paint files."""

from __future__ import annotations

import io
import json
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lipkit.cli.main import main
from lipkit.data.corpora import tuxpaint_captions
from lipkit.data.decode import decode_text
from lipkit.data.files import table_pairs
from lipkit.data.loader import make_train_loader
from lipkit.data.pack import PackOptions, file_items, pack
from lipkit.data.spec import open_mixture
from lipkit.models import get_tokenizer, image_transform

FALLBACK_WARNING = "captions are not valid UTF-8 and were read as Windows-1252 (Latin-1)"


@pytest.fixture(autouse=True)
def _index_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LIPKIT_CACHE_DIR", str(tmp_path / "cache"))


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def latin1_folder(root: Path) -> Path:
    """Three images: a Latin-1 caption file, a UTF-8 one and a Windows-1252 JSON sidecar."""
    root.mkdir()
    for i in range(3):
        (root / f"img{i}.jpg").write_bytes(jpeg(i))
    (root / "img0.txt").write_bytes("café crème".encode("latin-1"))
    (root / "img1.txt").write_bytes("naïve résumé".encode())
    (root / "img2.json").write_bytes(json.dumps({"caption": "“quoted” déjà"}, ensure_ascii=False).encode("cp1252"))
    return root


def fallback_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if FALLBACK_WARNING in str(w.message)]


def test_the_policy_is_utf8_then_windows_1252_then_latin1():
    assert decode_text("café".encode()) == ("café", False)
    assert decode_text("café".encode("latin-1")) == ("café", True)
    assert decode_text(b"\x93quoted\x94 \x80") == ("“quoted” €", True)  # Windows-1252's own characters
    assert decode_text(b"caf\xe9 \x81") == ("café \x81", True)  # 0x81 is undefined in Windows-1252: Latin-1


def test_a_latin1_caption_file_is_packed_decoded_counted_and_warned_once(tmp_path, capsys):
    src = latin1_folder(tmp_path / "src")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = pack(file_items(src), tmp_path / "out", PackOptions(samples_per_shard=4), progress=False)
    assert fallback_warnings(caught) == [f"packing {tmp_path / 'out'}: 2 {FALLBACK_WARNING}"]
    assert result.caption_fallbacks == 2 and result.successes == 3
    with tarfile.open(tmp_path / "out" / "00000.tar") as tar:
        texts = [tar.extractfile(f"00000{i}.txt").read() for i in range(3)]
    assert texts == ["café crème".encode(), "naïve résumé".encode(), "“quoted” déjà".encode()]
    assert json.loads((tmp_path / "out" / "00000_stats.json").read_text())["caption_fallbacks"] == 2
    assert main(["data", "pack", str(src), "--out-dir", str(tmp_path / "out2"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "3 of 3 pairs in 1 shards" in out and out.rstrip().endswith("left out: none; 2 captions not UTF-8")


def test_a_folder_source_counts_fallbacks_for_training(tmp_path):
    latin1_folder(tmp_path / "src")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mixture = open_mixture(str(tmp_path / "src"))
    assert fallback_warnings(caught) == [f"{tmp_path / 'src'}: 2 {FALLBACK_WARNING}"]
    source = mixture.sources[0]
    assert [source.caption(i) for i in range(3)] == ["café crème", "naïve résumé", "“quoted” déjà"]
    assert source.caption_fallbacks == 2
    transform, tokenize = image_transform("micro", train=True), get_tokenizer("micro")
    loader = make_train_loader(mixture, transform, tokenize, batch_size=3, seed=0, num_steps=1)
    assert loader.stats.caption_fallbacks == 2
    assert loader.stats.summary() == "2 captions not UTF-8, read as Windows-1252 (Latin-1)"


def test_table_cells_are_decoded_one_by_one(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(i))
    rows = ["image,caption", "0.jpg,café", "1.jpg,“quoted”", '2.jpg,"naïve, plain"']
    encodings = ["utf-8", "latin-1", "cp1252", "utf-8"]  # one file with cells of three encodings
    (tmp_path / "pairs.csv").write_bytes(b"\n".join(r.encode(e) for r, e in zip(rows, encodings)) + b"\n")
    pairs = table_pairs(tmp_path / "pairs.csv")
    assert [(p.caption, p.caption_fallback) for p in pairs] == [
        ("café", True),
        ("“quoted”", True),
        ("naïve, plain", False),
    ]
    assert [p.image_path.name for p in pairs] == ["0.jpg", "1.jpg", "2.jpg"]


def test_a_shard_caption_member_in_latin1_is_read_counted_and_warned_once(tmp_path):
    members = {"a.jpg": jpeg(0), "a.txt": "café".encode("latin-1"), "b.jpg": jpeg(1), "b.txt": "thé".encode()}
    members |= {"c.jpg": jpeg(2), "c.json": json.dumps({"caption": "crème"}, ensure_ascii=False).encode("latin-1")}
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        source = open_mixture(str(tmp_path / "00000.tar")).sources[0]
    assert fallback_warnings(caught) == [f"{tmp_path / '00000.tar'}: 2 {FALLBACK_WARNING}"]
    assert [source.caption(i) for i in range(3)] == ["café", "thé", "crème"] and source.caption_fallbacks == 2


def test_tuxpaint_caption_files_follow_the_policy(tmp_path):
    (tmp_path / "stamp.txt").write_bytes("a café\nfr.utf8=un café\n".encode("latin-1"))
    assert tuxpaint_captions(tmp_path / "stamp.txt") == ({"en": "a café", "fr": "un café"}, True)
    (tmp_path / "utf8.txt").write_bytes("a tea\nfr.utf8=un thé\n".encode())
    assert tuxpaint_captions(tmp_path / "utf8.txt") == ({"en": "a tea", "fr": "un thé"}, False)
    assert tuxpaint_captions(tmp_path / "missing.txt") == ({}, False)

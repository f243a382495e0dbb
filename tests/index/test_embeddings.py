"""The embeddings folder: parts written and read back, damage and foreign folders named in one line."""

from __future__ import annotations

import numpy as np
import pytest

from lipkit.data.embeddings import (
    EmbeddingsError,
    ModelRecord,
    PartInfo,
    open_embeddings,
    part_name,
    part_number,
    read_table,
    vectors_path,
    write_manifest,
    write_part,
)

RECORD = ModelRecord("ab" * 32, 4, "micro", None)


def _unit(n: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, 4)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _write(folder, name, keys, seed, extra=None):
    vectors = {"image": _unit(len(keys), seed), "text": _unit(len(keys), seed + 1)}
    rows = {
        "key": keys,
        "caption": [f"caption {k}" for k in keys],
        "source": ["emoji"] * len(keys),
        "path": [None] * len(keys),
        "thumbnail": [b"\xff\xd8jpeg"] * len(keys),
        "_stamp": ["s"] * len(keys),
        **(extra or {}),
    }
    info = PartInfo(len(keys), "digest-" + name, {"undecodable_image": 1}, [["bad", "s", "undecodable_image"]])
    write_part(folder, name, vectors, rows, info)
    return vectors, info


def _manifest(parts):
    return {
        "format": "lipkit-embeddings",
        "version": 1,
        "model": RECORD.to_dict(),
        "modalities": ["image", "text"],
        "data": "emoji",
        "parts": {name: info.to_manifest() for name, info in parts.items()},
    }


def test_parts_round_trip(tmp_path):
    v0, i0 = _write(tmp_path, part_name(0), ["a", "b", "c"], 0, {"width": [1, 2, 3]})
    v1, i1 = _write(tmp_path, part_name(1), ["d"], 5, {"width": [7]})
    write_manifest(tmp_path, _manifest({"part-00001": i1, "part-00000": i0}))
    emb = open_embeddings(tmp_path)
    assert emb.record == RECORD and emb.modalities == ["image", "text"] and emb.data == "emoji"
    assert emb.parts == ["part-00000", "part-00001"] and len(emb) == 4
    parts = list(emb.iter_parts())
    assert [p.keys for p in parts] == [["a", "b", "c"], ["d"]]
    np.testing.assert_array_equal(parts[0].vectors["image"], v0["image"])
    np.testing.assert_array_equal(parts[1].vectors["text"], v1["text"])
    assert parts[0].metadata[1] == {
        "caption": "caption b",
        "source": "emoji",
        "path": None,
        "thumbnail": b"\xff\xd8jpeg",
        "width": 2,
    }
    _, info = read_table(tmp_path, "part-00000", ["key"])
    assert info == i0


def test_a_damaged_part_is_named(tmp_path):
    _, info = _write(tmp_path, "part-00000", ["a", "b"], 0)
    write_manifest(tmp_path, _manifest({"part-00000": info}))
    file = vectors_path(tmp_path, "part-00000", "image")
    file.write_bytes(file.read_bytes()[:100])
    with pytest.raises(EmbeddingsError, match=r"part-00000\.image\.npy.*lipkit embed"):
        list(open_embeddings(tmp_path).iter_parts())


def test_a_folder_without_manifest_or_of_another_format_is_refused(tmp_path):
    with pytest.raises(EmbeddingsError, match="not an embeddings folder"):
        open_embeddings(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "other"}')
    with pytest.raises(EmbeddingsError, match="not a lipkit embeddings manifest"):
        open_embeddings(tmp_path)
    (tmp_path / "manifest.json").write_text('{"format": "lipkit-embeddings", "version": 9}')
    with pytest.raises(EmbeddingsError, match="version 9"):
        open_embeddings(tmp_path)


def test_part_names():
    assert part_name(42) == "part-00042" and part_number("part-00042") == 42
    assert part_number("part-123456") == 123456 and part_number("manifest") is None

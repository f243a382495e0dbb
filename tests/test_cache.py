"""Checksummed on-disk caches: a damaged entry is detected, removed and rebuilt, never used."""

from __future__ import annotations

import pytest
import torch

from lipkit.cache import cached, load_cached, save_cached


def _payload() -> dict:
    return {"image": torch.arange(12, dtype=torch.float32).view(3, 4), "labels": torch.tensor([1, 2, 3]), "n": 3}


def test_round_trip_and_reuse(tmp_path):
    path = tmp_path / "entry.pt"
    calls = []

    def compute():
        calls.append(1)
        return _payload()

    first = cached(path, compute)
    second = cached(path, compute)
    assert len(calls) == 1
    assert torch.equal(first["image"], second["image"]) and second["n"] == 3


@pytest.mark.parametrize("damage", ["flip-a-byte", "truncate", "garbage", "edit-a-value"])
def test_a_damaged_entry_is_rebuilt_with_a_warning(tmp_path, damage):
    path = tmp_path / "entry.pt"
    save_cached(path, _payload())
    raw = bytearray(path.read_bytes())
    if damage == "flip-a-byte":  # inside the tensor data, which torch.load would read without complaint
        at = raw.find(torch.arange(12, dtype=torch.float32).view(3, 4).numpy().tobytes())
        assert at > 0
        raw[at + 5] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytearray(b"not a torch file at all")
    if damage == "edit-a-value":  # a well-formed file whose contents no longer match their digest
        entry = torch.load(path, weights_only=True)
        entry["payload"]["n"] = 4
        torch.save(entry, path)
    else:
        path.write_bytes(bytes(raw))
    with pytest.warns(UserWarning, match="damaged"):
        assert load_cached(path) is None
    assert not path.exists()
    rebuilt = cached(path, _payload)
    assert torch.equal(rebuilt["image"], _payload()["image"])
    assert load_cached(path)["n"] == 3  # the rebuilt entry is sound


def test_a_check_rejects_entries_of_the_wrong_shape(tmp_path):
    path = tmp_path / "entry.pt"
    save_cached(path, _payload())
    with pytest.warns(UserWarning, match="expected shapes"):
        assert load_cached(path, check=lambda p: p["image"].shape == (5, 4)) is None
    assert load_cached(path) is None  # removed


def test_an_unwritable_cache_only_warns(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.warns(UserWarning, match="cannot write"):
        out = cached(blocker / "sub" / "entry.pt", _payload)  # a folder under a file cannot be made
    assert out["n"] == 3

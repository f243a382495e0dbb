from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
from PIL import Image

from lipkit.data.corpora import render_emoji, tuxpaint_captions, tuxpaint_stamps
from lipkit.data.curation.dedup import (
    band_masks,
    caption_duplicates,
    exact_duplicates,
    group_duplicates,
    image_digest,
    image_phash,
    near_duplicates,
    near_pairs,
    semantic_duplicates,
)

EMOJI = (0x1F436, 0x1F431, 0x1F697, 0x1F333, 0x1F3E0, 0x2B50, 0x1F34E, 0x1F6B2, 0x1F41F, 0x1F680)


def png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def reencoded(data: bytes, scale: float = 0.75, quality: int = 90) -> bytes:
    """A near copy: composited onto white, resized and saved as JPEG."""
    image = Image.open(io.BytesIO(data)).convert("RGBA")
    flat = Image.new("RGB", image.size, "white")
    flat.paste(image, mask=image.getchannel("A"))
    small = flat.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    """30 unrelated real images (Tux Paint stamps and emoji), by key."""
    stamps = [p for p in tuxpaint_stamps() if "en" in tuxpaint_captions(p.with_suffix(".txt"))[0]][::40][:20]
    found = {f"tux/{p.stem}": p.read_bytes() for p in stamps}
    found.update({f"emoji/{cp:05x}": png(render_emoji(chr(cp))) for cp in EMOJI})
    assert len(found) == 30
    return found


def test_exact_and_near_find_exactly_the_planted_duplicates(images):
    keys = sorted(images)
    data = dict(images)
    # exact copies: one named before its original (so the copy is the one kept), one after
    data["a-copy"] = images[keys[3]]
    data[keys[7] + "~copy"] = images[keys[7]]
    # near copies: resized and re-encoded, under names before and after the originals
    data["0-near"] = reencoded(images[keys[0]])
    data[keys[12] + "~near"] = reencoded(images[keys[12]], 1.25, 85)
    data[keys[26] + "~near"] = reencoded(images[keys[26]], 0.6, 80)
    names = list(data)
    exact = exact_duplicates(names, [image_digest(data[k]) for k in names])
    assert exact.kept_for == {keys[3]: "a-copy", keys[7] + "~copy": keys[7]}
    hashes = np.array([image_phash(Image.open(io.BytesIO(data[k]))) for k in names], np.uint64)
    near = near_duplicates(names, hashes, max_distance=4)
    assert near.kept_for == {
        **exact.kept_for,
        keys[0]: "0-near",
        keys[12] + "~near": keys[12],
        keys[26] + "~near": keys[26],
    }
    assert all(0 <= d <= 4 for d in near.similarity.values()) and set(near.similarity) == set(near.kept_for)
    # unrelated images are far apart: nothing is found among the originals even at 3x the distance
    originals = np.array([image_phash(Image.open(io.BytesIO(images[k]))) for k in keys], np.uint64)
    assert len(near_duplicates(keys, originals, max_distance=12)) == 0


def test_results_ignore_row_order(images):
    keys = sorted(images)
    names = [*keys, "zz-copy", "aa-copy"]
    digests = [image_digest(images[k]) for k in keys] + [image_digest(images[keys[5]])] * 2
    expected = {keys[5]: "aa-copy", "zz-copy": "aa-copy"}
    assert exact_duplicates(names, digests).kept_for == expected
    order = np.random.default_rng(0).permutation(len(names))
    assert exact_duplicates([names[i] for i in order], [digests[i] for i in order]).kept_for == expected


def brute_force_pairs(hashes: np.ndarray, max_distance: int) -> dict[tuple[int, int], int]:
    found = {}
    for i, j in itertools.combinations(range(len(hashes)), 2):
        d = bin(int(hashes[i]) ^ int(hashes[j])).count("1")
        if d <= max_distance:
            found[(i, j)] = d
    return found


@pytest.mark.parametrize("max_distance", [0, 1, 3, 6, 10])
def test_multi_index_hashing_is_exact(max_distance):
    rng = np.random.default_rng(max_distance)
    base = rng.integers(0, 2**63, 60, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 60, dtype=np.uint64)
    masks = [sum(1 << int(b) for b in rng.choice(64, i % 12, replace=False)) for i in range(120)]
    flips = [base[i % 60] ^ np.uint64(mask) for i, mask in enumerate(masks)]  # copies with 0-11 bits flipped
    hashes = np.concatenate([base, np.array(flips, np.uint64)])
    assert near_pairs(hashes, max_distance) == brute_force_pairs(hashes, max_distance)
    widths = [bin(mask).count("1") for _, mask in band_masks(max_distance)]
    assert sum(widths) == 64 and max(widths) - min(widths) <= 1


def test_groups_are_connected_components_keeping_the_smallest_key():
    keys = ["d", "b", "e", "a", "c", "f"]
    # chain d-b-e (b smallest), pair a-c (a), f alone
    assert group_duplicates(keys, [(0, 1), (1, 2), (3, 4)]) == {"d": "b", "e": "b", "c": "a"}


def test_caption_duplicates_compare_normalised_text():
    keys = ["k3", "k1", "k2", "k4"]
    found = caption_duplicates(keys, ["A red Car!", "a red car !", "a  RED car!", "a red cart"])
    assert found.kept_for == {"k3": "k1", "k2": "k1"}


def planted_embeddings(seed: int = 0) -> tuple[list[str], np.ndarray]:
    """6 groups of 2-5 near-identical unit vectors (cosine > 0.97 within) and 12 loners (all others < 0.6)."""
    rng = np.random.default_rng(seed)
    dim = 48
    centres = np.linalg.qr(rng.normal(size=(dim, dim)))[0][:18]  # orthonormal: loners and centres are far apart
    rows, keys = [], []
    for g, size in enumerate([2, 3, 5, 2, 4, 3]):
        for m in range(size):
            v = centres[g] + 0.08 * rng.normal(size=dim) / np.sqrt(dim)
            rows.append(v / np.linalg.norm(v))
            keys.append(f"g{g}-{rng.integers(1000):03d}-{m}")
    for i in range(12):
        rows.append(centres[6 + i])
        keys.append(f"single-{i:02d}")
    return keys, np.array(rows, np.float32)


def brute_force_semantic(keys: list[str], vectors: np.ndarray, threshold: float) -> dict[str, str]:
    sims = vectors @ vectors.T
    pairs = [(i, j) for i, j in itertools.combinations(range(len(keys)), 2) if sims[i, j] >= threshold]
    return group_duplicates(keys, pairs)


@pytest.mark.parametrize("clusters", [1, 6, None])
def test_semantic_dedup_equals_brute_force(clusters):
    keys, vectors = planted_embeddings()
    expected = brute_force_semantic(keys, vectors, 0.94)
    assert len(expected) == 19 - 6  # every group keeps exactly one
    found = semantic_duplicates(keys, vectors, 0.94, clusters=clusters, seed=0)
    assert found.kept_for == expected
    assert all(found.kept_for[k] == min(k2 for k2 in keys if k2[:2] == k[:2]) for k in found.kept_for)
    assert all(s >= 0.94 for s in found.similarity.values())
    order = np.random.default_rng(1).permutation(len(keys))
    shuffled = semantic_duplicates([keys[i] for i in order], vectors[order], 0.94, clusters=clusters, seed=0)
    assert shuffled.kept_for == expected

"""Duplicate finding: exact image bytes, perceptual hashes, normalised captions and embeddings (SemDeDup).

Every finder takes the keys of the candidate rows with one value per row and returns a
:class:`Duplicates` mapping each dropped key to the key kept in its place. Duplicates form groups: the
connected components of the "is a duplicate of" relation (so a chain A~B~C is one group even when A and
C are further apart). The kept row of a group is the one with the smallest key, so the result depends
only on the set of rows, never on their order or on how they were split among workers.

* :func:`exact_duplicates`: equal SHA-256 digests of the image bytes.
* :func:`near_duplicates`: 64-bit perceptual hashes (``imagehash.phash``) within a Hamming distance,
  found exactly by multi-index hashing: the 64 bits are cut into ``distance + 1`` bands, and two hashes
  within the distance agree on at least one band (pigeonhole), so only rows sharing a band value are
  compared.
* :func:`caption_duplicates`: equal captions after :func:`lipkit.data.curation.text.normalise`.
* :func:`semantic_duplicates`: SemDeDup (Abbas et al., 2023): k-means (FAISS) over unit image
  embeddings, then within each cluster every pair with cosine similarity at least the threshold.
"""

from __future__ import annotations

import hashlib
import io
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

HASH_BITS = 64


@dataclass
class Duplicates:
    """Which rows a finder drops.

    Attributes:
        kept_for: Dropped key -> the key kept in its place (the smallest key of its group).
        similarity: Dropped key -> how close it is to the nearest member of its group it was linked to
            (Hamming distance for near duplicates, cosine for semantic ones; absent for exact matches).
    """

    kept_for: dict[str, str] = field(default_factory=dict)
    similarity: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.kept_for)


def image_digest(data: bytes) -> str:
    """SHA-256 hex digest of encoded image bytes."""
    return hashlib.sha256(data).hexdigest()


def image_phash(image: Image.Image) -> int:
    """The 64-bit perceptual hash of an image (transparency composited onto white first)."""
    import imagehash

    from lipkit.data.decode import flatten

    bits = imagehash.phash(flatten(image)).hash.reshape(-1)  # (64,) bool, row-major
    return int(np.packbits(bits).view(">u8")[0])


def phash_of_bytes(data: bytes) -> int:
    """:func:`image_phash` of encoded image bytes."""
    return image_phash(Image.open(io.BytesIO(data)))


def group_duplicates(keys: Sequence[str], pairs: Iterable[tuple[int, int]]) -> dict[str, str]:
    """Connected components of ``pairs`` (row indexes): each non-smallest key -> its component's smallest key."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    members: dict[int, list[str]] = defaultdict(list)
    for i, key in enumerate(keys):
        members[root(i)].append(key)
    kept_for = {}
    for group in members.values():
        if len(group) > 1:
            smallest = min(group)
            kept_for.update({k: smallest for k in group if k != smallest})
    return kept_for


def equal_value_duplicates(keys: Sequence[str], values: Sequence[object]) -> Duplicates:
    """Rows with equal values are duplicates; the smallest key of each value is kept."""
    smallest: dict[object, str] = {}
    for key, value in zip(keys, values):
        if value not in smallest or key < smallest[value]:
            smallest[value] = key
    return Duplicates({k: smallest[v] for k, v in zip(keys, values) if smallest[v] != k})


def exact_duplicates(keys: Sequence[str], digests: Sequence[str]) -> Duplicates:
    """Rows whose image bytes have the same digest (:func:`image_digest`)."""
    return equal_value_duplicates(keys, digests)


def caption_duplicates(keys: Sequence[str], captions: Sequence[str]) -> Duplicates:
    """Rows whose captions are equal once normalised (case, punctuation and spacing ignored)."""
    from lipkit.data.curation.text import normalise

    return equal_value_duplicates(keys, [normalise(c) for c in captions])


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bitwise Hamming distances between uint64 arrays (element by element)."""
    return np.bitwise_count(np.bitwise_xor(a, b)).astype(np.int64)


def band_masks(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of the ``max_distance + 1`` bands the 64 hash bits are cut into (widths differ by <= 1)."""
    n = max_distance + 1
    widths = [HASH_BITS // n + (i < HASH_BITS % n) for i in range(n)]
    shifts = np.concatenate([[0], np.cumsum(widths)[:-1]]).tolist()
    return [(s, (1 << w) - 1) for s, w in zip(shifts, widths)]


def near_pairs(hashes: np.ndarray, max_distance: int) -> dict[tuple[int, int], int]:
    """Every pair of rows (i < j) whose hashes are within ``max_distance`` bits, with its distance.

    Exact: multi-index hashing finds the candidates (pairs sharing a band value), and each is checked.
    """
    hashes = np.asarray(hashes, np.uint64)
    if not 0 <= max_distance < HASH_BITS:
        raise ValueError(f"the Hamming distance must be in [0, {HASH_BITS - 1}], got {max_distance}")
    found: dict[tuple[int, int], int] = {}
    for shift, mask in band_masks(max_distance):
        band = (hashes >> np.uint64(shift)) & np.uint64(mask)
        order = np.argsort(band, kind="stable")
        ranked = band[order]
        starts = np.flatnonzero(ranked[1:] != ranked[:-1]) + 1
        for members in np.split(order, starts):
            if len(members) > 1:
                _check_bucket(np.sort(members), hashes, max_distance, found)
    return found


def _check_bucket(members: np.ndarray, hashes: np.ndarray, max_distance: int, found: dict) -> None:
    """Add the pairs of one bucket that are within the distance (each row against the later ones)."""
    for pos in range(len(members) - 1):
        i, later = members[pos], members[pos + 1 :]
        distances = hamming(hashes[later], hashes[i])
        for j, d in zip(later[distances <= max_distance].tolist(), distances[distances <= max_distance].tolist()):
            found[(int(i), j)] = d


def near_duplicates(keys: Sequence[str], hashes: np.ndarray, max_distance: int) -> Duplicates:
    """Rows whose perceptual hashes (:func:`image_phash`) are within ``max_distance`` bits, grouped."""
    pairs = near_pairs(hashes, max_distance)
    kept_for = group_duplicates(keys, pairs)
    return Duplicates(kept_for, _closest(keys, pairs, kept_for, smaller_is_closer=True))


def _closest(keys: Sequence[str], pairs: dict, kept_for: dict[str, str], smaller_is_closer: bool) -> dict[str, float]:
    """For each dropped key, its best link value (smallest distance or largest similarity) to its group."""
    best: dict[str, float] = {}
    pick = min if smaller_is_closer else max
    for (i, j), value in pairs.items():
        for key in (keys[i], keys[j]):
            if key in kept_for:
                best[key] = pick(best.get(key, value), value)
    return {k: float(v) for k, v in best.items()}


def semantic_duplicates(
    keys: Sequence[str], vectors: np.ndarray, threshold: float, clusters: int | None = None, seed: int = 0
) -> Duplicates:
    """SemDeDup: rows of the same k-means cluster whose embeddings have cosine similarity >= ``threshold``.

    Args:
        keys: Row keys.
        vectors: (N, D) unit embeddings, row i for ``keys[i]``.
        threshold: Cosine similarity at which two rows are duplicates.
        clusters: k-means clusters (``None``: one per :data:`CLUSTER_SIZE` rows); 1 compares every pair.
        seed: Seed of the k-means initialisation.
    """
    order = sorted(range(len(keys)), key=keys.__getitem__)  # a canonical order: the result ignores row order
    keys = [keys[i] for i in order]
    vectors = np.ascontiguousarray(np.asarray(vectors, np.float32)[order])
    labels = cluster_labels(vectors, clusters if clusters is not None else auto_clusters(len(keys)), seed)
    pairs: dict[tuple[int, int], float] = {}
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        sims = vectors[members] @ vectors[members].T  # (m, m)
        i, j = np.nonzero(np.triu(sims >= threshold, k=1))
        pairs.update({(int(members[a]), int(members[b])): float(sims[a, b]) for a, b in zip(i, j)})
    kept_for = group_duplicates(keys, pairs)
    return Duplicates(kept_for, _closest(keys, pairs, kept_for, smaller_is_closer=False))


CLUSTER_SIZE = 2000


def auto_clusters(n: int) -> int:
    """The default number of k-means clusters for ``n`` rows: about one per :data:`CLUSTER_SIZE`."""
    return max(1, round(n / CLUSTER_SIZE))


def cluster_labels(vectors: np.ndarray, clusters: int, seed: int) -> np.ndarray:
    """k-means (FAISS, spherical) cluster of each row; all rows in cluster 0 when ``clusters`` <= 1."""
    n = len(vectors)
    if clusters <= 1 or n <= clusters:
        return np.zeros(n, np.int64)
    import faiss

    kmeans = faiss.Kmeans(vectors.shape[1], clusters, niter=20, seed=seed, spherical=True, verbose=False)
    kmeans.train(vectors)
    _, labels = kmeans.index.search(vectors, 1)
    return labels[:, 0].astype(np.int64)

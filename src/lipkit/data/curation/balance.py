"""MetaCLIP balancing: per-entry match counts, entry probabilities and hash-seeded sampling.

Counts are a sum over pairs, so counts made per shard (:func:`count_matches`) merge by adding them
(:func:`merge_counts`). An entry matched by ``count`` pairs gets probability ``p = t / max(count, t)``
(:func:`entry_probability`): entries matched at most ``t`` times keep all their pairs, frequent ones keep about
``t``. A pair is kept when the coin of any entry it matches comes up, so its probability is
``1 - prod(1 - p)`` over its entries. Each coin is a pure function of (seed, entry id, sample key): a BLAKE2b
hash made uniform in [0, 1), so the kept set does not depend on batch order, batch size or worker count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from lipkit.data.curation import CurationError


def count_matches(batch_matches: Iterable[Sequence[int]], n_entries: int) -> np.ndarray:
    """How many pairs of a batch (or shard) match each entry.

    Args:
        batch_matches: Each pair's matched entry ids (each id once per pair, as the matcher returns them).
        n_entries: The number of metadata entries.

    Returns:
        An int64 array of length ``n_entries``.
    """
    ids = [i for matches in batch_matches for i in matches]
    flat = np.asarray(ids, dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= n_entries):
        raise CurationError(f"entry ids must lie in [0, {n_entries}); got {flat.min()}..{flat.max()}")
    return np.bincount(flat, minlength=n_entries).astype(np.int64)


def merge_counts(parts: Iterable[np.ndarray]) -> np.ndarray:
    """The counts of all pairs from the counts of each shard (their sum)."""
    parts = list(parts)
    if not parts:
        raise CurationError("no counts to merge")
    return np.sum(np.stack(parts), axis=0, dtype=np.int64)


def entry_probability(counts: np.ndarray, t: float) -> np.ndarray:
    """Each entry's sampling probability ``t / max(count, t)`` (1 for entries matched at most ``t`` times)."""
    if not t > 0:
        raise CurationError(f"the balancing threshold t must be positive, got {t}")
    counts = np.asarray(counts, dtype=np.float64)
    return t / np.maximum(counts, t)


def coin(key: str, entry: int, seed: int) -> float:
    """The uniform [0, 1) draw for sample ``key`` and entry id ``entry`` under ``seed``: a pure function."""
    digest = hashlib.blake2b(f"{seed}\0{entry}\0".encode() + key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


def keep_mask(
    keys: Sequence[str],
    matches: Sequence[Sequence[int]],
    probs: np.ndarray,
    seed: int,
    keep_unmatched: bool = False,
) -> np.ndarray:
    """Which pairs balancing keeps: those for which the coin of any matched entry comes up.

    Args:
        keys: The pairs' sample keys (unique within the data set).
        matches: Each pair's matched entry ids.
        probs: Each entry's probability (:func:`entry_probability`).
        seed: The sampling seed.
        keep_unmatched: Keep pairs that match no entry (MetaCLIP drops them).

    Returns:
        A bool array, one per pair.
    """
    if len(keys) != len(matches):
        raise CurationError(f"{len(keys)} keys but {len(matches)} match lists")
    return np.fromiter(
        (_kept(key, ids, probs, seed, keep_unmatched) for key, ids in zip(keys, matches)), dtype=bool, count=len(keys)
    )


def _kept(key: str, ids: Sequence[int], probs: np.ndarray, seed: int, keep_unmatched: bool) -> bool:
    if len(ids) == 0:
        return keep_unmatched
    chances = [float(probs[i]) for i in ids]
    if max(chances) >= 1.0:  # that coin always comes up
        return True
    return any(coin(key, i, seed) < p for i, p in zip(ids, chances))

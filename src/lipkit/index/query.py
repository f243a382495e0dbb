"""Query building blocks: weighted combinations of query vectors and near-duplicate collapsing of results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

import numpy as np

from lipkit.index.errors import QueryError

T = TypeVar("T")


def normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as float32.

    Raises:
        QueryError: A row is zero or not finite (nothing to compare by angle).
    """
    vectors = np.atleast_2d(np.asarray(vectors, dtype=np.float32))
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms < 1e-12):
        raise QueryError("a query vector is zero or not finite: nothing to search by")
    return vectors / norms


def combine(vectors: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """The weighted sum of query vectors, L2-normalised: ``"car" - "toy"`` is ``combine([car, toy], [1, -1])``.

    Each vector is normalised first, so a weight says how much of a direction goes in, whatever the source
    (text or image) of the vector.

    Args:
        vectors: Query vectors, each (D,) or (1, D), all of one width.
        weights: One weight per vector; negative weights steer away.

    Returns:
        One (D,) float32 unit vector.

    Raises:
        QueryError: No vectors, counts or widths that differ, or a sum that cancels to zero.
    """
    if len(vectors) == 0 or len(vectors) != len(weights):
        raise QueryError(f"combine needs one weight per vector: {len(vectors)} vectors, {len(weights)} weights")
    rows = [np.asarray(v, dtype=np.float32).reshape(-1) for v in vectors]
    if len({row.shape[0] for row in rows}) != 1:
        raise QueryError(f"combined vectors differ in size: {sorted({row.shape[0] for row in rows})}")
    total = (np.asarray(weights, dtype=np.float64)[:, None] * normalize(np.stack(rows))).sum(axis=0)  # (D,)
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise QueryError("the weighted query terms cancel out to nothing: change a weight or a term")
    return (total / norm).astype(np.float32)


def collapse_near_duplicates(hits: Sequence[T], vectors: np.ndarray, threshold: float) -> list[T]:
    """Keep one hit of each group of near-duplicates among the results.

    Two results are neighbours when the cosine of their vectors is at least ``threshold``; the groups are the
    connected components of that relation (as clip-retrieval's deduplication does), and each group keeps its
    first hit, the best ranked one.

    Args:
        hits: Results, best first.
        vectors: (len(hits), D) unit vectors of the hits, row i for ``hits[i]``.
        threshold: Cosine at or above which two results count as duplicates (e.g. 0.94).

    Returns:
        The kept hits, in their order.
    """
    n = len(hits)
    if n < 2:
        return list(hits)
    similar = np.asarray(vectors, dtype=np.float32) @ np.asarray(vectors, dtype=np.float32).T  # (n, n)
    parent = list(range(n))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in zip(*np.nonzero(np.triu(similar >= threshold, k=1))):
        a, b = root(int(i)), root(int(j))
        if a != b:
            parent[max(a, b)] = min(a, b)  # the component's root is its best-ranked hit
    return [hit for i, hit in enumerate(hits) if root(i) == i]

"""Semantic deduplication throughput: lipkit's SemDeDup (FAISS k-means, pairs within each cluster) against
the exhaustive all-pairs comparison it approximates.

The vectors are synthetic unit embeddings shaped like a real collection: ``--n`` rows around ``--topics``
topic centres, and a ``--dup-fraction`` of them planted as near copies of another row (cosine about 0.98,
above the 0.94 threshold, as a re-encoded or resized image gives). Two measurements:

* **Equal size, both methods** (``--exhaustive-n`` rows): the exhaustive comparison (the (n, n) similarity
  matrix in blocks, every pair at or above the threshold) and lipkit's :func:`semantic_duplicates` on the
  same rows; it prints rows/s of each, the ratio, and the share of the exhaustive duplicate rows that
  clustering finds (SemDeDup compares within a cluster only, so a pair split across clusters is missed).
* **lipkit at full size** (``--n`` rows): rows/s, and the planted copies found.

Run: ``PYTHONPATH=src python benchmarks/curation_semdedup.py --n 1000000 --exhaustive-n 50000``
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lipkit.data.curation.dedup import group_duplicates, semantic_duplicates
from results import append_result

THRESHOLD = 0.94


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="rows for lipkit's full-size run (default: 1,000,000)")
    p.add_argument("--exhaustive-n", type=int, default=50_000, help="rows both methods read (default: 50,000)")
    p.add_argument("--dim", type=int, default=512, help="embedding width (default: 512)")
    p.add_argument("--topics", type=int, default=2_000, help="topic centres (default: 2,000)")
    p.add_argument("--dup-fraction", type=float, default=0.1, help="rows planted as copies (default: 0.1)")
    p.add_argument("--threshold", type=float, default=THRESHOLD, help=f"cosine threshold (default: {THRESHOLD})")
    p.add_argument("--seed", type=int, default=0, help="seed of the vectors and of k-means")
    p.add_argument("--json", metavar="FILE", help="append the result as one JSON line to FILE")
    return p.parse_args(argv)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def make_vectors(n: int, dim: int, topics: int, dup_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` unit rows around ``topics`` centres; returns them and the planted copies' rows (row, original)."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.standard_normal((topics, dim), dtype=np.float32))
    topic = rng.integers(0, topics, n)
    # spread within a topic: cosine to the centre about 0.6, between two members about 0.35
    vectors = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        rows = slice(start, min(n, start + 100_000))
        noise = rng.standard_normal((rows.stop - rows.start, dim), dtype=np.float32) / np.sqrt(dim)
        vectors[rows] = unit(centres[topic[rows]] * 0.75 + noise)
    copies = rng.choice(n, int(n * dup_fraction), replace=False)
    originals = rng.integers(0, n, len(copies))
    keep = ~np.isin(originals, copies)  # a copy of a row that is itself a copy would chain
    copies, originals = copies[keep], originals[keep]
    noise = rng.standard_normal((len(copies), dim), dtype=np.float32) / np.sqrt(dim)
    vectors[copies] = unit(vectors[originals] + 0.2 * noise)  # cosine about 0.98
    return vectors, np.stack([copies, originals], 1)


def exhaustive_duplicates(keys: Sequence[str], vectors: np.ndarray, threshold: float, block: int = 4096) -> set[int]:
    """The rows dropped when every pair is compared (blocked matmul), grouped as lipkit groups its pairs."""
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(vectors), block):
        sims = vectors[start : start + block] @ vectors.T  # (b, n)
        rows, cols = np.nonzero(sims >= threshold)
        pairs.extend((int(c), int(start + r)) for r, c in zip(rows, cols) if c < start + r)
    return {int(k) for k in group_duplicates(keys, pairs)}


def dropped_rows(keys: Sequence[str], vectors: np.ndarray, threshold: float, seed: int) -> set[int]:
    """Rows lipkit's SemDeDup drops (every member of a duplicate group but the one with the smallest key)."""
    found = semantic_duplicates(keys, vectors, threshold, seed=seed)
    return {int(k) for k in found.kept_for}


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def main(argv: Sequence[str] | None = None) -> None:
    """Build the vectors, compare both methods at equal size, then run lipkit at full size."""
    args = parse_args(argv)
    n = max(args.n, args.exhaustive_n)
    vectors, planted = make_vectors(n, args.dim, args.topics, args.dup_fraction, args.seed)
    keys = [f"{i:09d}" for i in range(n)]  # zero-padded: key order is row order, so the smallest key is kept
    print(f"{n:,} vectors of {args.dim} dims around {args.topics:,} topics, {len(planted):,} planted copies")

    m = args.exhaustive_n
    exact, exact_s = timed(exhaustive_duplicates, keys[:m], vectors[:m], args.threshold)
    ours, ours_s = timed(dropped_rows, keys[:m], vectors[:m], args.threshold, args.seed)
    share = len(ours & exact) / max(1, len(exact))
    wrong = len(ours - exact)
    print(f"\n{m:,} rows, both methods:")
    print(f"{'':12}{'seconds':>10}{'rows/s':>12}{'dropped':>10}")
    print(f"{'exhaustive':12}{exact_s:>10.2f}{m / exact_s:>12,.0f}{len(exact):>10,}")
    print(f"{'lipkit':12}{ours_s:>10.2f}{m / ours_s:>12,.0f}{len(ours):>10,}")
    print(f"ratio lipkit/exhaustive {exact_s / ours_s:.1f}x; lipkit finds {share:.1%} of the exhaustive duplicate rows")
    if wrong:  # only rounding at the threshold can do this: clustering compares a subset of the same pairs
        print(f"lipkit dropped {wrong} rows the exhaustive comparison keeps")

    row = {**vars(args), "equal_n": m, "exhaustive_s": exact_s, "lipkit_s": ours_s, "ratio": exact_s / ours_s}
    row |= {"exhaustive_dropped": len(exact), "lipkit_dropped": len(ours), "found_share": share}
    if args.n > m:
        full, full_s = timed(dropped_rows, keys, vectors, args.threshold, args.seed)
        planted_found = np.isin(planted[:, 0], list(full)) | np.isin(planted[:, 1], list(full))
        print(f"\nlipkit, {n:,} rows: {full_s:.1f} s, {n / full_s:,.0f} rows/s, {len(full):,} dropped;")
        print(f"planted pairs with one side dropped: {planted_found.mean():.1%}")
        row |= {"full_s": full_s, "full_rows_per_s": n / full_s, "full_dropped": len(full)}
        row |= {"planted_found": float(planted_found.mean())}
    append_result(args.json, "curation_semdedup", row)


if __name__ == "__main__":
    main()

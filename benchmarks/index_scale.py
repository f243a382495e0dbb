"""Index scale: build time, bytes per vector, recall@10 against exact search and queries/s at N vectors.

Makes ``--n`` synthetic 512-d unit vectors (deterministic from ``--seed``): points scattered around
``--clusters`` random centres, as image embeddings cluster, plus 1,000 held-out queries drawn the same way.
For each index type it builds a real :class:`lipkit.index.store.SearchIndex` (SQLite with every vector and
a metadata row, the FAISS index, the tuned default search settings) in a temporary folder, then measures

- build time (SQLite rows, training, adding, tuning, the first snapshot),
- bytes per vector of the FAISS snapshot, and of the whole folder (SQLite keeps the exact vectors),
- recall@10 of the default search against exact brute force over all vectors, on the 1,000 queries,
- queries/s of ``SearchIndex.search`` (batches of ``--batch-size`` queries, k=10, metadata included).

The types: ``auto`` under the default memory budget (IVF-Flat above 20,000 vectors), ``auto`` under each
``--small-budget`` (IVF-PQ re-ranked with the stored vectors), and any FAISS factory strings in ``--types``
(``IDMap2,Flat`` is the exact baseline; ``HNSW32`` builds slowly on few cores).

Run: ``PYTHONPATH=src python benchmarks/index_scale.py --n 1000000`` (about 2 GB of vectors in memory per
million; 10,000,000 needs about 45 GB of memory and disk).

``--engine-only`` measures lipkit's FAISS engine alone where the whole index does not fit the machine: the
vectors are written to a memory-mapped file (4 bytes x 512 per vector, in ``--tmp-dir``) in place of
SQLite, the index type is the one ``auto`` picks under each ``--small-budget`` (several may be given; the
vectors are made once), trained and filled as :class:`SearchIndex` does (in chunks), its default search
settings tuned by the same procedure, and the re-ranking reads the exact vectors from that file.
``--n 10000000 --engine-only --small-budget 256MB 1GB`` needs about 21 GB of disk and a few GB of memory,
and about 35 minutes on 2 cores (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lipkit.data.embeddings import ModelRecord
from lipkit.index.store import SearchIndex, choose_index, parse_bytes
from results import append_result

DIM = 512


def vector_blocks(n: int, clusters: int, seed: int, chunk: int = 200_000) -> Iterator[np.ndarray]:
    """``n`` unit vectors around ``clusters`` random centres (float32), in blocks of ``chunk`` to bound memory."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    for start in range(0, n, chunk):
        size = min(chunk, n - start)
        block = centres[rng.integers(0, clusters, size)] + rng.standard_normal((size, DIM), dtype=np.float32)
        yield block / np.linalg.norm(block, axis=1, keepdims=True)


def make_vectors(n: int, clusters: int, seed: int, out: np.ndarray | None = None) -> np.ndarray:
    """``n`` vectors of :func:`vector_blocks`, written into ``out`` (e.g. a memory-mapped file) when given."""
    out = np.empty((n, DIM), dtype=np.float32) if out is None else out
    start = 0
    for block in vector_blocks(n, clusters, seed):
        out[start : start + len(block)] = block
        start += len(block)
    return out


def exact_kth(queries: np.ndarray, vectors: np.ndarray, k: int = 10, chunk: int = 100_000) -> np.ndarray:
    """(Q,) the k-th best exact score of each query."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start in range(0, len(vectors), chunk):
        block = queries @ vectors[start : start + chunk].T
        best = -np.sort(-np.concatenate([best, block], axis=1), axis=1)[:, :k]
    return best[:, k - 1]


def measure(
    kind: str, factory: str, budget: int | None, vectors: np.ndarray, queries: np.ndarray, kth: np.ndarray, args
) -> dict:
    """Build one index in a temporary folder and measure it."""
    record = ModelRecord("0" * 64, DIM, "synthetic", None)
    keys = [f"v{i}" for i in range(len(vectors))]
    metadata = [{"source": ("a", "b", "c")[i % 3]} for i in range(len(vectors))]
    folder = Path(tempfile.mkdtemp(prefix="index_scale.", dir=args.tmp_dir))
    try:
        start = time.perf_counter()
        index = SearchIndex.build(
            folder / "ix", keys, vectors, metadata, record=record, index_type=factory, memory_budget=budget
        )
        build_s = time.perf_counter() - start
        del keys, metadata
        hits = index.search(queries, 10)
        recall = float(np.mean([sum(h.score >= kth[q] - 1e-5 for h in hits[q]) / 10 for q in range(len(queries))]))
        start = time.perf_counter()
        for b in range(0, len(queries), args.batch_size):
            index.search(queries[b : b + args.batch_size], 10)
        qps = len(queries) / (time.perf_counter() - start)
        info = index.info(recall_sample=0)
        disk = sum(p.stat().st_size for p in (folder / "ix").iterdir() if p.is_file())
        index.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return {
        "type": kind, "index_type": info["index_type"], "search_params": info["search_params"],
        "build_s": round(build_s, 1), "bytes_per_vector": info["bytes_per_vector"],
        "folder_bytes_per_vector": round(disk / len(vectors), 1), "recall_at_10": round(recall, 4),
        "queries_per_s": round(qps, 1),
    }  # fmt: skip


def engine_only(args: argparse.Namespace) -> list[dict]:
    """Build and measure lipkit's FAISS engine over vectors in a memory-mapped file (see the module notes),
    once per memory budget in ``--small-budget``, on the same vectors."""
    folder = Path(tempfile.mkdtemp(prefix="index_scale.", dir=args.tmp_dir))
    try:
        start = time.perf_counter()
        # the vectors and held-out queries of the in-memory mode, written to disk
        both = np.lib.format.open_memmap(folder / "vectors.npy", "w+", np.float32, (args.n + args.queries, DIM))
        make_vectors(args.n + args.queries, args.clusters, args.seed, out=both)
        both.flush()
        vectors, queries = both[: args.n], np.ascontiguousarray(both[args.n :])
        kth = exact_kth(queries, vectors, chunk=200_000)
        print(f"{args.n:,} x {DIM} vectors on disk, ground truth in {time.perf_counter() - start:.1f} s", flush=True)
        return [engine_row(budget, vectors, queries, kth, args) for budget in args.small_budget]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def engine_row(budget: str, vectors: np.ndarray, queries: np.ndarray, kth: np.ndarray, args) -> dict:
    """The index ``auto`` picks under ``budget``: trained, filled in chunks and tuned as SearchIndex does."""
    import faiss

    from lipkit.index import store

    plan = store.choose_index(args.n, DIM, parse_bytes(budget))
    start = time.perf_counter()
    index = faiss.index_factory(DIM, plan.factory, faiss.METRIC_INNER_PRODUCT)
    store._train(index, vectors, plan.factory)
    print(f"{plan.factory}: trained in {time.perf_counter() - start:.1f} s", flush=True)
    for lo in range(0, args.n, 500_000):
        chunk = np.ascontiguousarray(vectors[lo : lo + 500_000])
        index.add_with_ids(chunk, np.arange(lo + 1, lo + len(chunk) + 1, dtype=np.int64))
    print(f"{args.n:,} vectors added at {time.perf_counter() - start:.1f} s", flush=True)
    engine = store._engine_of(index, mutable=True)
    params = store._tune(engine, vectors)
    build_s = time.perf_counter() - start
    print(f"tuned to {params} at {build_s:.1f} s", flush=True)

    def search(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        refine = params.get("refine", 1)
        search_params = faiss.SearchParametersIVF(nprobe=params["nprobe"]) if "nprobe" in params else None
        scores, vids = store._search(index, batch, 10 * refine, search_params)
        if refine > 1:
            unique = np.unique(vids[vids >= 0])
            scores, vids = store._rerank(batch, vids, unique, vectors[unique - 1], 10)
        return scores, vids

    _, vids = search(queries)  # recall from the exact scores of the ids found (PQ scores are estimates)
    exact = np.einsum("qkd,qd->qk", vectors[np.clip(vids[:, :10], 1, None) - 1], queries)
    recall = float(np.mean(np.sum((exact >= kth[:, None] - 1e-5) & (vids[:, :10] > 0), axis=1) / 10))
    start = time.perf_counter()
    for b in range(0, len(queries), args.batch_size):
        search(queries[b : b + args.batch_size])
    qps = len(queries) / (time.perf_counter() - start)
    return {
        "type": f"engine only, budget {budget}", "index_type": plan.factory, "search_params": params,
        "build_s": round(build_s, 1), "bytes_per_vector": store._code_size(index) or 0,
        "folder_bytes_per_vector": None, "recall_at_10": round(recall, 4), "queries_per_s": round(qps, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000, help="vectors in the index (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=1000, help="held-out queries (default 1000)")
    parser.add_argument("--clusters", type=int, default=1000, help="centres the vectors gather around")
    parser.add_argument("--batch-size", type=int, default=100, help="queries per search call (default 100)")
    parser.add_argument(
        "--small-budget", nargs="+", default=["256MB"], help="memory budgets of the compressed auto indexes"
    )
    parser.add_argument("--types", nargs="*", default=[], metavar="FACTORY", help="more FAISS factory strings")
    parser.add_argument("--no-default", action="store_true", help="skip auto under the default memory budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tmp-dir", default=None, help="where the indexes are built (default: the system's)")
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    parser.add_argument(
        "--engine-only", action="store_true", help="lipkit's FAISS engine over a memory-mapped file, no SQLite"
    )
    args = parser.parse_args()
    if args.engine_only:
        rows = engine_only(args)
        for row in rows:
            print(
                f"{row['type']:<22} {row['index_type']:<20} build {row['build_s']:8.1f} s  {row['bytes_per_vector']} "
                f"B/vector code  recall@10 {row['recall_at_10']:.3f}  {row['queries_per_s']:9.1f} queries/s  "
                f"{row['search_params']}",
                flush=True,
            )
        append_result(args.json, "index_scale", {"n": args.n, "dim": DIM, "cpus": os.cpu_count(), "results": rows})
        return

    start = time.perf_counter()
    both = make_vectors(args.n + args.queries, args.clusters, args.seed)
    vectors, queries = both[: args.n], np.ascontiguousarray(both[args.n :])
    kth = exact_kth(queries, vectors)
    print(f"{args.n:,} x {DIM} vectors, {args.queries} queries, ground truth in {time.perf_counter() - start:.1f} s")
    runs = [] if args.no_default else [("auto", "auto", None)]
    runs += [(f"auto, budget {budget}", "auto", parse_bytes(budget)) for budget in args.small_budget]
    runs += [(factory, factory, None) for factory in args.types]
    rows = []
    for kind, factory, budget in runs:
        if factory == "auto" and choose_index(args.n, DIM, budget).factory in [r["index_type"] for r in rows]:
            continue  # the small budget chose the same type
        row = measure(kind, factory, budget, vectors, queries, kth, args)
        rows.append(row)
        print(
            f"{row['type']:<22} {row['index_type']:<20} build {row['build_s']:8.1f} s  "
            f"{row['bytes_per_vector']:7.1f} B/vector (folder {row['folder_bytes_per_vector']:.0f})  "
            f"recall@10 {row['recall_at_10']:.3f}  {row['queries_per_s']:9.1f} queries/s  {row['search_params']}",
            flush=True,
        )
    threads = os.cpu_count()
    append_result(args.json, "index_scale", {"n": args.n, "dim": DIM, "cpus": threads, "results": rows})


if __name__ == "__main__":
    main()

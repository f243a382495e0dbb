"""A search index: FAISS for the nearest-neighbour search, SQLite beside it for keys, metadata and vectors.

One index is one folder::

    INDEX/meta.sqlite              keys, stable ids, metadata (JSON), thumbnails, every vector (float32 blob),
                                   the model record, the index settings and a log of changes (WAL mode)
    INDEX/vectors-000000000042.faiss   the FAISS index as of change 42 (a snapshot)
    INDEX/.lock                    held by the process that writes (see :class:`lipkit.utils.FolderLock`)

**Durability.** SQLite is the source of truth. ``add`` and ``delete`` are one SQLite transaction each
(synchronous, so a change is on disk before the call returns); the transaction also appends the change
to a log. Only then is the in-memory FAISS index changed. The FAISS file is a snapshot tagged in its name
with the last change it holds; it is written under a temporary name and renamed (:func:`atomic_write`), then
the log up to it is dropped. Opening an index reads the newest snapshot and replays the newer changes from
the log. A kill at any moment leaves either the old or the new state of a change, never a mixture, and no
acknowledged change is lost. Snapshots are written after a tenth of the collection has changed, by
:meth:`SearchIndex.save`, and on :meth:`SearchIndex.close`.

**Ids.** Each key keeps one integer id for its life (``Hit.id``). FAISS labels are vector ids (``vid``): each
stored vector gets a new one, so an upsert on an index that cannot remove (HNSW) leaves the old vector as a
tombstone, excluded from every search by an ID selector until :meth:`SearchIndex.compact` rebuilds.

**Index types** (:func:`choose_index`, after autofaiss): exact ``IDMap2,Flat`` below 20,000 vectors;
``IVF{K},Flat`` when the full vectors fit the memory budget; ``IVF{K},PQ{m}x8`` otherwise, re-ranked with the
exact vectors from SQLite; memory-mapped from disk when even that does not fit. K is a power of two near
4·√N up to a million vectors and near √N beyond (:func:`nlist_for`), trained on up to 100·K vectors. Any
FAISS factory string can be asked for instead (``HNSW32``...). The
default search settings (``nprobe``, ``efSearch``, re-ranking depth) are tuned at build time for recall@10 of
at least 0.95 against exact search, and stored in the index. Scores are inner products of unit vectors
(cosine similarity).

**Live changes.** A memory-mapped index is read-only to FAISS: its new vectors go to a small exact index
beside it and its removed ones become tombstones, until :meth:`SearchIndex.compact`. Searches run while
other threads add and delete (a reader-writer lock). A second process sees the changes of the writing one
on its next search.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
import threading
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lipkit.data.embeddings import ModelRecord
from lipkit.errors import LipkitError, StorageError
from lipkit.index.errors import IndexFormatError, ModelMismatchError, QueryError, UnknownKeyError
from lipkit.index.filters import parse_filter
from lipkit.index.query import collapse_near_duplicates, normalize
from lipkit.utils import FolderLock, atomic_temporaries, atomic_write, strict_json

if TYPE_CHECKING:
    pass

FORMAT, VERSION = "lipkit-index", 1
DB_NAME = "meta.sqlite"
SNAPSHOT = re.compile(r"^vectors-(\d{12})\.faiss$")
FLAT_LIMIT = 20_000  # below this many vectors, exact search
DEFAULT_MEMORY_BUDGET = 8 * 2**30
PQ_SIZES = (64, 32, 16, 8)  # bytes per PQ code, largest first
# re-ranking depths the tuner tries for a compressed index, as multiples of k: dense collections need deep
# re-ranking (IVF4096,PQ64 at 1,000,000 synthetic vectors: recall 0.887 with 16 x 10 candidates at every nprobe)
REFINE_DEPTHS = (1, 4, 16, 64, 256)
MAX_K, MAX_DEPTH = 1000, 10_000  # k per page; k + offset
RECALL_GOAL, TUNE_TARGET = 0.95, 0.98  # tuning aims above the goal so that other queries still meet it
EXACT_FILTER_LIMIT = 2_000  # a filter that selects fewer items is searched exactly (vectors read from SQLite)
SNAPSHOT_FRACTION, SNAPSHOT_MIN = 0.1, 1000
COLLAPSE_DEPTH = 3  # a collapsed search looks this many times deeper
_CHUNK = 20_000  # rows per SQLite batch when streaming vectors

SCHEMA = """
CREATE TABLE IF NOT EXISTS info (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT, key TEXT NOT NULL UNIQUE, vid INTEGER NOT NULL UNIQUE,
    vector BLOB NOT NULL, meta TEXT NOT NULL, thumbnail BLOB);
CREATE TABLE IF NOT EXISTS changes (seq INTEGER PRIMARY KEY AUTOINCREMENT, vid INTEGER NOT NULL, op INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS columns (name TEXT PRIMARY KEY, kind TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Hit:
    """One search result.

    Attributes:
        key: The item's key.
        score: Cosine similarity with the query.
        metadata: The item's metadata (caption, source, path, extras), without the thumbnail.
        id: The item's stable integer id.
    """

    key: str
    score: float
    metadata: dict[str, Any]
    id: int = -1


@dataclass(frozen=True)
class IndexPlan:
    """A FAISS factory string and whether the index is read memory-mapped."""

    factory: str
    mmap: bool = False


def nlist_for(n: int) -> int:
    """IVF cells for ``n`` vectors: a power of two near 4·√n up to a million vectors, near √n (at least 4,096)
    beyond, with at least 39 training points per cell.

    A query costs about K + nprobe·n/K distance computations, least near 4·√n cells; building costs n·K (every
    vector is compared with every centroid, in training and when it is added). Above a million vectors that
    build term is what a CPU machine waits for (10,000,000 vectors into 16,384 cells did not finish training in
    19 minutes on 2 cores), so the cells grow only as √n there.
    """
    target = 4 * math.sqrt(max(n, 1)) if n <= 1_000_000 else max(4096.0, math.sqrt(n))
    k = 2 ** max(4, round(math.log2(target)))
    while k > 16 and n < 39 * k:
        k //= 2
    return k


def choose_index(n: int, dim: int, memory_budget: int | None = None) -> IndexPlan:
    """The index type for ``n`` vectors of width ``dim`` under a memory budget, as autofaiss chooses.

    Args:
        n: Vectors to index.
        dim: Their width.
        memory_budget: Bytes the index may take in memory (default :data:`DEFAULT_MEMORY_BUDGET`).
    """
    budget = DEFAULT_MEMORY_BUDGET if memory_budget is None else memory_budget
    if n < FLAT_LIMIT:
        return IndexPlan("IDMap2,Flat", mmap=n * (dim * 4 + 16) > budget)
    k = nlist_for(n)
    centroids = k * dim * 4
    if n * (dim * 4 + 8) + centroids <= budget:
        return IndexPlan(f"IVF{k},Flat")
    sizes = [m for m in PQ_SIZES if dim % m == 0] or [dim]
    for m in sizes:
        if n * (m + 8) + centroids <= budget:
            return IndexPlan(f"IVF{k},PQ{m}x8np")
    return IndexPlan(f"IVF{k},PQ{sizes[0]}x8np", mmap=True)


def parse_bytes(text: str) -> int:
    """``2GB``, ``512MiB``, ``1.5G``, ``100000`` -> bytes (K, M, G, T in powers of 1024).

    Raises:
        LipkitError: Not a size.
    """
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?b)?\s*", text.lower())
    if not match:
        raise LipkitError(f"{text!r} is not a size: write e.g. 2GB, 512MB or 100000")
    return int(float(match.group(1)) * 1024 ** " kmgt".index(match.group(2) or " "))


class RWLock:
    """A reader-writer lock: many readers at once, or one writer; waiting writers go first."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = self._writers_waiting = 0
        self._writing = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writing or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


@dataclass
class _Engine:
    """The FAISS side of an index: the main index, the exact delta beside a read-only one, the tombstones."""

    main: Any
    mutable: bool  # FAISS may change main (not memory-mapped)
    removable: bool  # main supports remove_ids
    exact: bool  # main is a flat (exact) index
    delta: Any = None
    delta_vids: set[int] = field(default_factory=set)
    dead: set[int] = field(default_factory=set)
    _dead_selector: Any = None

    def add(self, vids: np.ndarray, vectors: np.ndarray) -> None:
        if not len(vids):
            return
        if self.mutable:
            self.main.add_with_ids(vectors, vids)
            return
        if self.delta is None:
            import faiss

            self.delta = faiss.IndexIDMap2(faiss.IndexFlatIP(vectors.shape[1]))
        self.delta.add_with_ids(vectors, vids)
        self.delta_vids.update(int(v) for v in vids)

    def remove(self, vids: Sequence[int]) -> None:
        import faiss

        in_delta = [v for v in vids if v in self.delta_vids]
        if in_delta:
            self.delta.remove_ids(faiss.IDSelectorBatch(np.asarray(in_delta, dtype=np.int64)))
            self.delta_vids.difference_update(in_delta)
        taken = set(in_delta)
        rest = [v for v in vids if v not in taken]
        if rest and self.mutable and self.removable:
            self.main.remove_ids(faiss.IDSelectorBatch(np.asarray(rest, dtype=np.int64)))
        elif rest:
            self.dead.update(rest)
            self._dead_selector = None

    def dead_selector(self) -> Any:
        """An ID selector that excludes the tombstones (None when there are none); built once per change."""
        import faiss

        if self.dead and self._dead_selector is None:
            batch = faiss.IDSelectorBatch(np.fromiter(self.dead, dtype=np.int64, count=len(self.dead)))
            self._dead_selector = (batch, faiss.IDSelectorNot(batch))  # the batch must outlive the Not
        return self._dead_selector[1] if self.dead else None

    @property
    def ntotal(self) -> int:
        return int(self.main.ntotal) + (int(self.delta.ntotal) if self.delta is not None else 0)


class SearchIndex:
    """A live vector index over one collection, made by one model (see the module docstring).

    Make one with :meth:`build` or :meth:`build_from_embeddings`, open one with :meth:`open`. Thread-safe:
    searches run concurrently with each other and with :meth:`add` and :meth:`delete` from other threads.
    """

    def __init__(self, path: Path, db: sqlite3.Connection, engine: _Engine, seq: int, mmap: bool) -> None:
        self.path, self._db, self._engine, self._seq, self._mmap = path, db, engine, seq, mmap
        self._lock, self._db_mutex, self._writer_mutex = RWLock(), threading.Lock(), threading.Lock()
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._writer_lock: FolderLock | None = None
        self._filters: OrderedDict[tuple[str, int], tuple[np.ndarray, Any]] = OrderedDict()
        self._filters_mutex = threading.Lock()
        self._pending = 0
        self._count: int | None = None  # items, counted on first use and kept up to date by add and delete
        self._data_version = db.execute("PRAGMA data_version").fetchone()[0]
        info = _read_info(db)
        self.record = ModelRecord.from_dict(info["model"])
        self.modality: str = info["modality"]
        self.index_type: str = info["index_type"]
        self.params: dict[str, int] = dict(info["params"])
        self._apply_params()

    # ----- making and opening -----

    @classmethod
    def build(
        cls,
        path: str | Path,
        keys: Sequence[str],
        vectors: np.ndarray,
        metadata: Sequence[Mapping[str, Any]],
        *,
        record: ModelRecord,
        modality: str = "image",
        index_type: str = "auto",
        memory_budget: int | None = None,
    ) -> SearchIndex:
        """Build a new index folder at ``path``; its SQLite file, written aside and renamed in last, completes it.

        Args:
            path: The index folder; it must not hold an index yet.
            keys: Unique item keys.
            vectors: (N, D) float32 embeddings, row i for ``keys[i]``; normalised here.
            metadata: One dict per item (caption, source, path, thumbnail bytes, extras).
            record: The model that made the vectors.
            modality: ``image`` or ``text``: what the vectors embed.
            index_type: ``auto`` (:func:`choose_index`) or a FAISS factory string.
            memory_budget: Bytes the index may take in memory, for ``auto``.

        Raises:
            IndexFormatError: ``path`` already holds an index.
            QueryError: Sizes that do not match, duplicate keys, or vectors of another width than the model's.
            LipkitError: ``index_type`` is not a FAISS factory string FAISS can build.
        """
        path = Path(path)
        if (path / DB_NAME).exists():
            raise IndexFormatError(f"{path} already holds an index: delete it first, or use `lipkit index add`")
        keys, vectors, metadata = _check_items(keys, vectors, metadata, record.embed_dim)
        if len(set(keys)) != len(keys):
            raise QueryError(f"{len(keys) - len(set(keys))} duplicate keys in the items to index")
        auto = index_type == "auto"
        plan = choose_index(len(keys), vectors.shape[1], memory_budget) if auto else IndexPlan(index_type)
        with FolderLock(path, "lipkit index build"):
            engine = _new_engine(plan.factory, vectors)
            params = _tune(engine, vectors)
            _write_folder(path, keys, vectors, metadata, record, modality, plan, params, engine)
        return cls.open(path)

    @classmethod
    def build_from_embeddings(
        cls,
        path: str | Path,
        embeddings_dir: str | Path,
        *,
        modality: str = "image",
        index_type: str = "auto",
        memory_budget: int | None = None,
    ) -> SearchIndex:
        """Build an index of an embeddings folder written by ``lipkit embed`` (all its parts).

        Raises:
            LipkitError: The folder has no vectors of ``modality``; as :meth:`build` otherwise.
        """
        from lipkit.data.embeddings import open_embeddings

        embeddings = open_embeddings(embeddings_dir)
        _check_modality(embeddings.modalities, modality, embeddings_dir)
        keys: list[str] = []
        blocks: list[np.ndarray] = []
        metadata: list[dict[str, Any]] = []
        for part in embeddings.iter_parts():
            keys += part.keys
            blocks.append(part.vectors[modality])
            metadata += part.metadata
        dim = embeddings.record.embed_dim
        vectors = np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)
        return cls.build(
            path, keys, vectors, metadata, record=embeddings.record, modality=modality,
            index_type=index_type, memory_budget=memory_budget,
        )  # fmt: skip

    @classmethod
    def open(cls, path: str | Path, *, mmap: bool = False) -> SearchIndex:
        """Open an index folder; changes newer than its FAISS snapshot are replayed from SQLite.

        Args:
            path: The index folder.
            mmap: Read the FAISS index memory-mapped from disk (also when the index was built that way).

        Raises:
            IndexFormatError: No index there, or a damaged or missing file; the message says which and what to do.
        """
        path = Path(path)
        db = _connect(path)
        info = _read_info(db)
        snapshot, seq = _latest_snapshot(path)
        mmap = mmap or bool(info.get("mmap"))
        engine = _load_engine(snapshot, mmap)
        index = cls(path, db, engine, seq, mmap)
        with index._lock.write():
            index._sync()
            index._find_tombstones()
        return index

    @classmethod
    def repair(cls, path: str | Path) -> SearchIndex:
        """Rebuild the FAISS index of ``path`` from the vectors in its SQLite file (a lost or damaged snapshot).

        Raises:
            IndexFormatError: The SQLite file itself is missing or damaged.
        """
        path = Path(path)
        db = _connect(path)
        info = _read_info(db)
        vids, vectors = _all_vectors(db, int(info["dim"]))
        engine = _new_engine(info["index_type"], vectors, vids)
        seq = _last_seq(db)
        _write_snapshot(path, engine.main, seq)
        _drop_log(db, path, seq)
        db.close()
        return cls.open(path)

    # ----- properties -----

    @property
    def name(self) -> str:
        """The folder's name (how the server lists the index)."""
        return self.path.resolve().name

    def __len__(self) -> int:
        count = self._count
        if count is None:
            # counted and stored under the mutex that writers hold from their commit to their count update,
            # so a count taken before a concurrent write is never kept after it
            with self._db_mutex:
                if self._count is None:
                    self._count = int(self._db.execute("SELECT COUNT(*) FROM items").fetchone()[0])
                count = self._count
        return count

    def __repr__(self) -> str:
        return f"SearchIndex({str(self.path)!r}, {len(self)} items, {self.index_type})"

    def __enter__(self) -> SearchIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ----- model -----

    def check_model(self, record_or_fingerprint: ModelRecord | str) -> None:
        """Refuse vectors or queries of another model than the index's.

        Raises:
            ModelMismatchError: Naming both fingerprints and the index.
        """
        other = getattr(record_or_fingerprint, "fingerprint", record_or_fingerprint)
        if other != self.record.fingerprint:
            raise ModelMismatchError(
                f"{self.path} was built with model {self.record.fingerprint[:12]}, not {str(other)[:12]}: "
                "use the index's own model, or build an index of the other model's embeddings in another folder"
            )

    # ----- reading -----

    def contains(self, key: str) -> bool:
        """Whether ``key`` is in the index."""
        return bool(self._read("SELECT 1 FROM items WHERE key = ?", (key,)))

    def get(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """Metadata of each key (without thumbnail), None for a key the index does not hold."""
        found = {k: json.loads(m) for k, m in self._read_in("SELECT key, meta FROM items WHERE key IN ", keys)}
        return [found.get(k) for k in keys]

    def ids(self, keys: Sequence[str]) -> list[int | None]:
        """The stable integer id of each key, None for a key the index does not hold."""
        found = dict(self._read_in("SELECT key, id FROM items WHERE key IN ", keys))
        return [found.get(k) for k in keys]

    def keys_for_ids(self, ids: Sequence[int]) -> list[str | None]:
        """The key of each stable id, None for an id the index does not hold."""
        found = dict(self._read_in("SELECT id, key FROM items WHERE id IN ", [int(i) for i in ids]))
        return [found.get(int(i)) for i in ids]

    def vectors(self, keys: Sequence[str]) -> np.ndarray:
        """The stored (N, D) unit vectors of ``keys`` (for "more like this").

        Raises:
            UnknownKeyError: A key the index does not hold.
        """
        found = {k: _from_blob(b) for k, b in self._read_in("SELECT key, vector FROM items WHERE key IN ", keys)}
        missing = [k for k in keys if k not in found]
        if missing:
            raise UnknownKeyError(f"{self.name} has no item {missing[0]!r}" + _more(len(missing) - 1))
        return np.stack([found[k] for k in keys]) if keys else np.zeros((0, self.record.embed_dim), np.float32)

    def thumbnail(self, key: str) -> bytes | None:
        """The item's thumbnail (JPEG bytes), None when it has none.

        Raises:
            UnknownKeyError: A key the index does not hold.
        """
        rows = self._read("SELECT thumbnail FROM items WHERE key = ?", (key,))
        if not rows:
            raise UnknownKeyError(f"{self.name} has no item {key!r}")
        return bytes(rows[0][0]) if rows[0][0] is not None else None

    def columns(self) -> dict[str, str]:
        """The metadata columns a filter may name, each ``number`` or ``text`` (``key`` is always there)."""
        return dict(self._read("SELECT name, kind FROM columns ORDER BY name"))

    # ----- search -----

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        where: str | None = None,
        offset: int = 0,
        collapse: float | None = None,
    ) -> list[list[Hit]]:
        """The ``k`` nearest items to each query, best first.

        Args:
            queries: (Q, D) or (D,) query vectors of the index's model; normalised here.
            k: Results per query (a page), 1 to :data:`MAX_K`.
            where: A filter expression (:mod:`lipkit.index.filters`), applied inside the FAISS search.
            offset: Results to skip (the page start); ``k + offset`` is at most :data:`MAX_DEPTH`.
            collapse: Keep one of each group of results whose vectors have at least this cosine.

        Returns:
            One list of hits per query (shorter when fewer items qualify).

        Raises:
            QueryError: ``k`` or ``offset`` out of range, or queries of the wrong width.
            FilterError: A bad filter.
        """
        _check_page(k, offset)
        queries = self._check_queries(queries)
        depth = k + offset
        depth = min(MAX_DEPTH, depth * COLLAPSE_DEPTH) if collapse is not None else depth
        self._refresh_if_stale()
        with self._lock.read():
            allowed = self._filter(where) if where else None
            scores, vids = self._knn(queries, depth, allowed)
            rows = self._rows_for(np.unique(vids[vids >= 0]), with_vectors=collapse is not None)
        return [self._page(s, v, rows, k, offset, collapse) for s, v in zip(scores, vids)]

    def _page(
        self, scores: np.ndarray, vids: np.ndarray, rows: dict, k: int, offset: int, collapse: float | None
    ) -> list[Hit]:
        """One query's hits from FAISS labels: dropped when gone meanwhile, collapsed, then the page cut."""
        found = [(float(s), int(v)) for s, v in zip(scores, vids) if v >= 0 and int(v) in rows]
        hits = [Hit(rows[v][1], s, json.loads(rows[v][2]), rows[v][0]) for s, v in found]
        if collapse is not None and hits:
            vectors = np.stack([_from_blob(rows[v][3]) for _, v in found])
            hits = collapse_near_duplicates(hits, vectors, collapse)
        return hits[offset : offset + k]

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries, dtype=np.float32)
        queries = queries[None, :] if queries.ndim == 1 else queries
        if queries.ndim != 2 or queries.shape[1] != self.record.embed_dim or queries.shape[0] == 0:
            raise QueryError(
                f"queries of shape {tuple(queries.shape)}: {self.name} holds vectors of width {self.record.embed_dim}"
            )
        return np.ascontiguousarray(normalize(queries))

    def _filter(self, where: str) -> tuple[np.ndarray, Any]:
        """The sorted vids of the items that ``where`` selects and their FAISS ID selector.

        Cached per expression and change number, so that repeated filtered searches skip SQLite.
        """
        import faiss

        cache_key = (where, self._seq)
        with self._filters_mutex:
            if cache_key in self._filters:
                self._filters.move_to_end(cache_key)
                return self._filters[cache_key]
        condition, params = parse_filter(where).to_sql(self.columns())
        rows = self._read(f"SELECT vid FROM items WHERE {condition} ORDER BY vid", params)
        vids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        entry = (vids, faiss.IDSelectorBatch(vids) if len(vids) else None)
        with self._filters_mutex:
            self._filters[cache_key] = entry
            while len(self._filters) > 64:
                self._filters.popitem(last=False)
        return entry

    def _knn(
        self, queries: np.ndarray, depth: int, allowed: tuple[np.ndarray, Any] | None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(Q, depth) scores and vids of the nearest live vectors, among the filter's ``allowed`` when given."""
        engine = self._engine
        few = allowed is not None and (not len(allowed[0]) or len(allowed[0]) <= EXACT_FILTER_LIMIT)
        if allowed is not None and few and (not engine.exact or not len(allowed[0])):
            return _exact_search(queries, allowed[0], self._vectors_by_vid(allowed[0]), depth)
        refine = self.params.get("refine", 1)
        fetch = depth * refine if refine > 1 else depth
        fraction = len(allowed[0]) / max(engine.ntotal, 1) if allowed is not None else 1.0
        selector = allowed[1] if allowed is not None else engine.dead_selector()
        scores, vids = _search(engine.main, queries, fetch, self._search_params(selector, fraction))
        if engine.delta is not None and engine.delta.ntotal:
            import faiss

            params = faiss.SearchParameters(sel=selector) if selector is not None else None
            extra = _search(engine.delta, queries, fetch, params)
            scores, vids = _merge(scores, vids, *extra, fetch)
        if refine > 1:
            scores, vids = self._rerank(queries, vids, depth)
        return scores[:, :depth], vids[:, :depth]

    def _rerank(self, queries: np.ndarray, vids: np.ndarray, depth: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact scores for the candidates (from the stored vectors), best ``depth`` kept."""
        unique = np.unique(vids[vids >= 0])
        return _rerank(queries, vids, unique, self._vectors_by_vid(unique), depth)

    def _search_params(self, selector: Any, fraction: float) -> Any:
        """FAISS search parameters: the tuned defaults, deepened for a filter that keeps a small fraction."""
        import faiss

        scale = 1.0 / max(fraction, 1e-6)
        if "nprobe" in self.params:
            nlist = faiss.extract_index_ivf(self._engine.main).nlist
            nprobe = min(nlist, math.ceil(self.params["nprobe"] * scale))
            return faiss.SearchParametersIVF(sel=selector, nprobe=nprobe)
        if "efSearch" in self.params:
            ef = min(4096, math.ceil(self.params["efSearch"] * scale))
            return faiss.SearchParametersHNSW(sel=selector, efSearch=ef)
        return faiss.SearchParameters(sel=selector) if selector is not None else None

    def _rows_for(self, vids: np.ndarray, with_vectors: bool) -> dict[int, tuple]:
        """vid -> (id, key, meta JSON[, vector blob]) for the given vids."""
        columns = "vid, id, key, meta" + (", vector" if with_vectors else "")
        rows = self._read_in(f"SELECT {columns} FROM items WHERE vid IN ", [int(v) for v in vids])
        return {r[0]: tuple(r[1:]) for r in rows}

    def _vectors_by_vid(self, vids: np.ndarray) -> np.ndarray:
        """(len(vids), D) stored vectors, in the order of ``vids``."""
        found = dict(self._read_in("SELECT vid, vector FROM items WHERE vid IN ", [int(v) for v in vids]))
        if not len(vids):
            return np.zeros((0, self.record.embed_dim), np.float32)
        return np.stack([_from_blob(found[int(v)]) for v in vids])

    # ----- writing -----

    def add(self, keys: Sequence[str], vectors: np.ndarray, metadata: Sequence[Mapping[str, Any]]) -> int:
        """Add items, or replace the vector and metadata of keys the index holds (upsert); one atomic change.

        A key given twice keeps its last row.

        Returns:
            The number of distinct keys written.

        Raises:
            QueryError: Sizes that do not match, or vectors of another width than the index's.
            FolderInUseError: Another process is writing to the index.
        """
        keys, vectors, metadata = _check_items(keys, vectors, metadata, self.record.embed_dim)
        last = {key: i for i, key in enumerate(keys)}
        order = sorted(last.values())
        keys, vectors, metadata = [keys[i] for i in order], vectors[order], [metadata[i] for i in order]
        self._take_writer_lock()
        self._refresh_if_stale()
        with self._lock.write():
            with self._db_mutex:
                old, new, seq = _upsert(self._db, keys, vectors, metadata)
                self._count = None if self._count is None else self._count + len(new) - len(old)
            self._engine.remove(old)
            self._engine.add(new, vectors)
            self._changed(seq, len(old) + len(new))
        self._maybe_save()
        return len(keys)

    def delete(self, keys: Sequence[str]) -> int:
        """Remove items by key; keys the index does not hold are ignored.

        Returns:
            The number of items removed.
        """
        self._take_writer_lock()
        self._refresh_if_stale()
        with self._lock.write():
            with self._db_mutex:
                removed, seq = _delete(self._db, list(dict.fromkeys(keys)))
                self._count = None if self._count is None else self._count - len(removed)
            self._engine.remove(removed)
            self._changed(seq, len(removed))
        self._maybe_save()
        return len(removed)

    def save(self) -> None:
        """Write a FAISS snapshot of the current state now (and drop the log it covers)."""
        if self._mmap:
            return  # the snapshot is the mapped file; compact() writes a new one
        self._take_writer_lock()
        with self._lock.read():
            _write_snapshot(self.path, self._engine.main, self._seq)
            with self._db_mutex:
                _drop_log(self._db, self.path, self._seq)
            self._pending = 0

    def compact(self) -> None:
        """Rebuild the FAISS index from the stored vectors: drops tombstones and the exact delta, re-balances."""
        self._take_writer_lock()
        self._refresh_if_stale()
        with self._lock.write():
            vids, vectors = _all_vectors(self._reader(), self.record.embed_dim)
            engine = _new_engine(self.index_type, vectors, vids)
            _write_snapshot(self.path, engine.main, self._seq)
            with self._db_mutex:
                _drop_log(self._db, self.path, self._seq)
            self._engine = _load_engine(_latest_snapshot(self.path)[0], True) if self._mmap else engine
            self._pending = 0
            self._apply_params()

    def close(self) -> None:
        """Write a last snapshot if this object changed the index, and release the files."""
        if self._writer_lock is not None:
            if self._pending:
                self.save()
            self._writer_lock.release()
            self._writer_lock = None
        for conn in self._readers:
            conn.close()
        self._readers.clear()
        self._db.close()

    def _take_writer_lock(self) -> None:
        """Become the folder's one writer (on the first change; searching alone takes no lock)."""
        with self._writer_mutex:
            if self._writer_lock is None:
                self._writer_lock = FolderLock(self.path, "lipkit index (writing)").acquire()
                for tmp in atomic_temporaries(self.path):  # snapshots a killed writer left half-written
                    tmp.unlink(missing_ok=True)

    def _changed(self, seq: int, count: int) -> None:
        self._seq = seq
        self._pending += count
        with self._filters_mutex:
            self._filters.clear()

    def _maybe_save(self) -> None:
        """Snapshot after enough changes. The changes are safe in SQLite already, so a snapshot the disk
        refuses is a warning, not an error of the add or delete that triggered it."""
        if self._pending >= max(SNAPSHOT_MIN, SNAPSHOT_FRACTION * self._engine.ntotal):
            try:
                self.save()
            except StorageError as exc:
                warnings.warn(f"{exc} (the change itself is saved; opening the index replays it)", stacklevel=3)

    # ----- keeping in step with the log -----

    def _refresh_if_stale(self) -> None:
        """Replay what another process committed since this one last looked (cheap when nothing changed)."""
        with self._db_mutex:
            version = self._db.execute("PRAGMA data_version").fetchone()[0]
            stale = version != getattr(self, "_data_version", version)
            self._data_version = version
        if stale:
            with self._lock.write():
                self._sync()

    def _sync(self) -> None:
        """Apply the logged changes after ``self._seq`` to FAISS (under the write lock)."""
        with self._db_mutex:
            start = int(_read_info(self._db).get("log_start", 0))
            if self._seq < start:  # another process wrote a snapshot and dropped the log we needed
                snapshot, self._seq = _latest_snapshot(self.path)
                self._engine = _load_engine(snapshot, self._mmap)
                self._apply_params()
            sql = "SELECT seq, vid, op FROM changes WHERE seq > ? ORDER BY seq"
            log = self._db.execute(sql, (self._seq,)).fetchall()
        added: dict[int, None] = {}
        removed: list[int] = []
        for _, vid, op in log:
            if op > 0:
                added[vid] = None
            elif vid in added:
                del added[vid]
            else:
                removed.append(vid)
        self._engine.remove(removed)
        vids = np.fromiter(added, dtype=np.int64, count=len(added))
        self._engine.add(vids, self._vectors_by_vid(vids))
        if log:
            self._changed(log[-1][0], len(log))
            with self._db_mutex:
                self._count = None

    def _find_tombstones(self) -> None:
        """Vectors in an ID-mapped main index that no live item owns (an HNSW snapshot's deleted vectors)."""
        main = self._engine.main
        if (self._engine.removable and self._engine.mutable) or not hasattr(main, "id_map"):
            return
        import faiss

        labels = faiss.vector_to_array(main.id_map)
        live = np.fromiter((r[0] for r in self._read("SELECT vid FROM items")), dtype=np.int64)
        self._engine.dead |= {int(v) for v in np.setdiff1d(labels, live)}

    def _apply_params(self) -> None:
        """Set the tuned defaults on the FAISS index itself (for callers that search it directly)."""
        import faiss

        main = self._engine.main
        if "nprobe" in self.params:
            faiss.extract_index_ivf(main).nprobe = self.params["nprobe"]
        hnsw = _hnsw_of(main)
        if hnsw is not None and "efSearch" in self.params:
            hnsw.hnsw.efSearch = self.params["efSearch"]

    # ----- checks and figures -----

    def check(self) -> list[str]:
        """Problems found comparing FAISS with SQLite (empty when consistent): a test and repair aid."""
        labels = _labels(self._engine)
        live = np.fromiter((r[0] for r in self._read("SELECT vid FROM items")), dtype=np.int64)
        problems = []
        values, counts = np.unique(labels, return_counts=True)
        if np.any(counts > 1):
            problems.append(f"{int(np.sum(counts > 1))} vectors are in FAISS more than once")
        present = np.setdiff1d(values, np.fromiter(self._engine.dead, dtype=np.int64))
        if len(np.setdiff1d(live, present)):
            problems.append(f"{len(np.setdiff1d(live, present))} items have no vector in FAISS")
        if len(np.setdiff1d(present, live)):
            problems.append(f"{len(np.setdiff1d(present, live))} FAISS vectors belong to no item")
        return problems

    def info(self, recall_sample: int = 200) -> dict[str, Any]:
        """Size, type, bytes per vector, search settings, recall@10 against exact search, and the model.

        Args:
            recall_sample: Stored vectors used as queries for the recall measurement (0 to skip it).
        """
        snapshot, _ = _latest_snapshot(self.path)
        main_count = int(self._engine.main.ntotal)
        disk = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        return {
            "path": str(self.path), "name": self.name, "items": len(self), "modality": self.modality,
            "index_type": self.index_type, "faiss_class": type(_inner(self._engine.main)).__name__,
            "search_params": dict(self.params), "memory_mapped": self._mmap,
            "bytes_per_vector": round(snapshot.stat().st_size / main_count, 1) if main_count else None,
            "code_size": _code_size(self._engine.main), "disk_bytes": disk,
            "tombstones": len(self._engine.dead), "delta": len(self._engine.delta_vids),
            "pending_changes": self._pending,
            "columns": self.columns(), "recall_at_10": self.measure_recall(recall_sample) if recall_sample else None,
            "model": self.record.to_dict(),
        }  # fmt: skip

    def measure_recall(self, sample: int = 200, k: int = 10, seed: int = 0) -> float | None:
        """Recall@k of the default search against exact search, with ``sample`` stored vectors as queries.

        Each query's own item is left out (it would be a free hit): the search asks for k + 1 results. An
        exact neighbour counts as found when a result scores at least as high as the (k + 1)-th exact score
        (ties make any of the tied items right). None for an index of fewer than two items.
        """
        sql = "SELECT vector FROM items ORDER BY (id * 2654435761 + ?) % 4294967296 LIMIT ?"  # a fixed shuffle
        rows = self._read(sql, (seed, sample))
        k = min(k, len(self) - 1)
        if k < 1 or not rows:
            return None
        queries = np.stack([_from_blob(r[0]) for r in rows])
        truth = np.full((len(queries), k + 1), -np.inf, dtype=np.float32)
        for vectors in self._stream_vectors():
            block = queries @ vectors.T  # (Q, chunk)
            truth = -np.sort(-np.concatenate([truth, block], axis=1), axis=1)[:, : k + 1]
        hits = self.search(queries, k + 1)
        # exact scores of what was found (a compressed index's are estimates), the vectors read in one query
        keys = sorted({h.key for results in hits for h in results})
        found, row = self.vectors(keys), {key: i for i, key in enumerate(keys)}
        scores = np.full((len(queries), k + 1), -np.inf, dtype=np.float32)
        for q, results in enumerate(hits):
            if results:
                scores[q, : len(results)] = found[[row[h.key] for h in results]] @ queries[q]
        return _recall_leaving_self_out(scores, truth[:, k : k + 1], k)

    def _stream_vectors(self) -> Iterator[np.ndarray]:
        last = -1
        while True:
            rows = self._read("SELECT id, vector FROM items WHERE id > ? ORDER BY id LIMIT ?", (last, _CHUNK))
            if not rows:
                return
            last = rows[-1][0]
            yield np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)

    # ----- SQLite reading -----

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path / DB_NAME, timeout=60, check_same_thread=False)
            conn.execute("PRAGMA query_only = 1")
            self._local.conn = conn
            self._readers.append(conn)
        return conn

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self._reader().execute(sql, params).fetchall()

    def _read_in(self, sql: str, values: Sequence[Any]) -> list[tuple]:
        """``sql`` ending in ``IN `` run over ``values`` in chunks."""
        rows: list[tuple] = []
        values = list(values)
        for start in range(0, len(values), 5000):
            chunk = values[start : start + 5000]
            rows += self._read(sql + "(" + ",".join("?" * len(chunk)) + ")", chunk)
        return rows


# ----- items -----


def _check_items(
    keys: Sequence[str], vectors: np.ndarray, metadata: Sequence[Mapping[str, Any]], dim: int
) -> tuple[list[str], np.ndarray, list[Mapping[str, Any]]]:
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise QueryError(f"vectors of shape {tuple(vectors.shape)}: expected (N, {dim}) for this model")
    if not len(keys) == len(vectors) == len(metadata):
        raise QueryError(f"{len(keys)} keys, {len(vectors)} vectors and {len(metadata)} metadata rows: they must match")
    keys = [str(k) for k in keys]
    if any(not k for k in keys):
        raise QueryError("an item has an empty key")
    return keys, np.ascontiguousarray(normalize(vectors)) if len(vectors) else vectors, list(metadata)


def _check_modality(modalities: Sequence[str], modality: str, where: str | Path) -> None:
    if modality not in modalities:
        raise LipkitError(f"{where} has no {modality} vectors (it has: {', '.join(modalities)})")


def _clean_meta(row: Mapping[str, Any]) -> tuple[str, bytes | None]:
    """(metadata as JSON text without the thumbnail, the thumbnail bytes)."""
    thumbnail = row.get("thumbnail")
    clean = {str(k): _plain(v) for k, v in row.items() if k not in ("thumbnail", "key") and not isinstance(v, bytes)}
    return strict_json(clean, sort_keys=True), bytes(thumbnail) if thumbnail is not None else None


def _plain(value: Any) -> Any:
    """A JSON value for ``value``: NumPy scalars to Python ones, anything else unknown to text."""
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool, list, dict)):
        return value
    return str(value)


def _kinds(metadata: Sequence[Mapping[str, Any]]) -> dict[str, str]:
    """Each metadata column's kind in ``metadata``: number when every non-null value is a number."""
    kinds: dict[str, str] = {}
    for row in metadata:
        for name, value in row.items():
            if name in ("thumbnail", "key") or value is None or isinstance(value, bytes):
                continue
            number = isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))
            kinds[name] = "number" if number and kinds.get(name, "number") == "number" else "text"
    return kinds


def _blob(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _from_blob(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32)


def _more(n: int) -> str:
    return f" (and {n} more unknown keys)" if n > 0 else ""


def _check_page(k: int, offset: int) -> None:
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= MAX_K:
        raise QueryError(f"k={k} is out of range: ask for 1 to {MAX_K} results per page")
    if not isinstance(offset, (int, np.integer)) or offset < 0 or k + offset > MAX_DEPTH:
        raise QueryError(f"offset={offset} is out of range: 0 or more, with k + offset at most {MAX_DEPTH}")


# ----- SQLite writing -----


def _connect(path: Path) -> sqlite3.Connection:
    """The index's SQLite database (WAL mode), checked to be one of ours."""
    db_path = path / DB_NAME
    if not db_path.is_file():
        what = "no such folder" if not path.exists() else f"no {DB_NAME} in it"
        raise IndexFormatError(f"{path} is not a lipkit index ({what}): build one with `lipkit index build`")
    try:
        db = sqlite3.connect(db_path, timeout=60, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        info = _read_info(db)
    except sqlite3.DatabaseError as exc:
        raise IndexFormatError(
            f"{db_path} is damaged ({exc}): build the index again from its embeddings with `lipkit index build`"
        ) from None
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise IndexFormatError(f"{db_path} is not a {FORMAT} version {VERSION} database")
    return db


def _read_info(db: sqlite3.Connection) -> dict[str, Any]:
    return {name: json.loads(value) for name, value in db.execute("SELECT name, value FROM info")}


def _set_info(db: sqlite3.Connection, values: Mapping[str, Any]) -> None:
    db.executemany("INSERT OR REPLACE INTO info VALUES (?, ?)", [(k, strict_json(v)) for k, v in values.items()])


def _last_seq(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
    return int(row[0]) if row else 0


def _merge_kinds(db: sqlite3.Connection, metadata: Sequence[Mapping[str, Any]]) -> None:
    known = dict(db.execute("SELECT name, kind FROM columns"))
    for name, kind in _kinds(metadata).items():
        merged = "number" if kind == "number" and known.get(name, "number") == "number" else "text"
        if known.get(name) != merged:
            db.execute("INSERT OR REPLACE INTO columns VALUES (?, ?)", (name, merged))


@contextmanager
def _transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction; a write the disk refuses (full, read-only) becomes a :class:`StorageError`."""
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
    except sqlite3.OperationalError as exc:
        if db.in_transaction:
            db.execute("ROLLBACK")
        where = db.execute("PRAGMA database_list").fetchone()[2]
        raise StorageError(f"cannot write {where}: {exc}") from None


def _upsert(
    db: sqlite3.Connection, keys: list[str], vectors: np.ndarray, metadata: list[Mapping[str, Any]]
) -> tuple[list[int], np.ndarray, int]:
    """Write items in one transaction: (replaced vids, new vids, last change number)."""
    with _transaction(db):
        old = dict(_select_in(db, "SELECT key, vid FROM items WHERE key IN ", keys))
        first = int(_read_info(db)["next_vid"])
        new = np.arange(first, first + len(keys), dtype=np.int64)
        rows = []
        for key, vid, vector, meta in zip(keys, new, vectors, metadata):
            text, thumbnail = _clean_meta(meta)
            rows.append((int(vid), _blob(vector), text, thumbnail, key))
        db.executemany("UPDATE items SET vid = ?, vector = ?, meta = ?, thumbnail = ? WHERE key = ?", rows)
        fresh = [r for r in rows if r[4] not in old]
        db.executemany("INSERT INTO items (vid, vector, meta, thumbnail, key) VALUES (?, ?, ?, ?, ?)", fresh)
        log = [(vid, -1) for vid in old.values()] + [(int(vid), 1) for vid in new]
        db.executemany("INSERT INTO changes (vid, op) VALUES (?, ?)", log)
        _set_info(db, {"next_vid": first + len(keys)})
        _merge_kinds(db, metadata)
    return list(old.values()), new, _last_seq(db)


def _delete(db: sqlite3.Connection, keys: list[str]) -> tuple[list[int], int]:
    """Remove items in one transaction: (their vids, last change number)."""
    with _transaction(db):
        found = _select_in(db, "SELECT key, vid FROM items WHERE key IN ", keys)
        db.executemany("DELETE FROM items WHERE key = ?", [(k,) for k, _ in found])
        db.executemany("INSERT INTO changes (vid, op) VALUES (?, -1)", [(v,) for _, v in found])
    return [v for _, v in found], _last_seq(db)


def _select_in(db: sqlite3.Connection, sql: str, values: Sequence[Any]) -> list[tuple]:
    rows: list[tuple] = []
    for start in range(0, len(values), 5000):
        chunk = list(values[start : start + 5000])
        rows += db.execute(sql + "(" + ",".join("?" * len(chunk)) + ")", chunk).fetchall()
    return rows


def _all_vectors(db: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
    rows = db.execute("SELECT vid, vector FROM items ORDER BY vid").fetchall()
    vids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    vectors = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
    return vids, np.ascontiguousarray(vectors)


def _write_folder(
    path: Path,
    keys: list[str],
    vectors: np.ndarray,
    metadata: list[Mapping[str, Any]],
    record: ModelRecord,
    modality: str,
    plan: IndexPlan,
    params: dict[str, int],
    engine: _Engine,
) -> None:
    """Write a new index's SQLite file and first snapshot (the SQLite file last: it marks the folder an index)."""
    _write_snapshot(path, engine.main, 0)
    tmp = path / f".{DB_NAME}.building"
    for stale in (tmp, Path(f"{tmp}-wal"), Path(f"{tmp}-shm")):
        stale.unlink(missing_ok=True)
    db = sqlite3.connect(tmp, isolation_level=None)
    db.execute("PRAGMA page_size = 16384")  # rows of ~2 KB vectors pack 7 to a page instead of 1 to 4 KB
    db.executescript(SCHEMA)
    with _transaction(db):
        info = {
            "format": FORMAT, "version": VERSION, "model": record.to_dict(), "modality": modality,
            "index_type": plan.factory, "mmap": plan.mmap, "dim": int(vectors.shape[1]), "params": params,
            "next_vid": len(keys) + 1, "log_start": 0,
        }  # fmt: skip
        _set_info(db, info)
        for start in range(0, len(keys), _CHUNK):
            rows = range(start, min(start + _CHUNK, len(keys)))
            db.executemany(
                "INSERT INTO items (key, vid, vector, meta, thumbnail) VALUES (?, ?, ?, ?, ?)",
                [(keys[i], i + 1, _blob(vectors[i]), *_clean_meta(metadata[i])) for i in rows],
            )
        _merge_kinds(db, metadata)
    db.close()
    tmp.replace(path / DB_NAME)


# ----- FAISS -----


def _new_engine(factory: str, vectors: np.ndarray, vids: np.ndarray | None = None) -> _Engine:
    """A FAISS index of ``factory`` (inner product), trained on a sample of ``vectors``, holding them all."""
    import faiss

    dim = vectors.shape[1]
    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as exc:
        message = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown"
        raise LipkitError(f"index type {factory!r} is not a FAISS factory string FAISS can build ({message})") from None
    if faiss.try_extract_index_ivf(index) is None and not hasattr(index, "id_map"):
        index = faiss.IndexIDMap2(index)
    if not index.is_trained:
        _train(index, vectors, factory)
    vids = np.arange(1, len(vectors) + 1, dtype=np.int64) if vids is None else vids
    if len(vectors):
        index.add_with_ids(vectors, vids)
    return _engine_of(index, mutable=True)


def _train(index: Any, vectors: np.ndarray, factory: str) -> None:
    """Train on up to 100 vectors per IVF cell (at least 256 per PQ centroid where there are that many)."""
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    cells = ivf.nlist if ivf is not None else 1
    if len(vectors) < cells:
        raise LipkitError(
            f"index type {factory!r} needs at least {cells} vectors to train, the collection has {len(vectors)}: "
            "use --type auto or fewer cells"
        )
    limit = max(100 * cells, 256 * 256)
    if len(vectors) > limit:
        vectors = vectors[np.sort(np.random.default_rng(0).choice(len(vectors), limit, replace=False))]
    sample = vectors
    index.train(np.ascontiguousarray(sample))


def _engine_of(index: Any, mutable: bool) -> _Engine:
    import faiss

    inner = _inner(index)
    return _Engine(index, mutable, removable=_hnsw_of(index) is None, exact=isinstance(inner, faiss.IndexFlat))


def _inner(index: Any) -> Any:
    """The index inside an IDMap wrapper, downcast to its class."""
    import faiss

    index = faiss.downcast_index(index)
    return faiss.downcast_index(index.index) if hasattr(index, "id_map") else index


def _hnsw_of(index: Any) -> Any:
    import faiss

    inner = _inner(index)
    return inner if isinstance(inner, faiss.IndexHNSW) else None


def _code_size(index: Any) -> int | None:
    try:
        return int(_inner(index).sa_code_size())
    except RuntimeError:
        return None


def _labels(engine: _Engine) -> np.ndarray:
    """Every label in the engine's FAISS indexes (with repeats, if any)."""
    import faiss

    parts = []
    for index in (engine.main, engine.delta):
        if index is None:
            continue
        if hasattr(index, "id_map"):
            parts.append(faiss.vector_to_array(index.id_map))
            continue
        invlists = faiss.extract_index_ivf(index).invlists
        for i in range(invlists.nlist):
            size = invlists.list_size(i)
            if size:
                parts.append(faiss.rev_swig_ptr(invlists.get_ids(i), size).copy())
    return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _tune(engine: _Engine, vectors: np.ndarray, sample: int = 200, k: int = 10) -> dict[str, int]:
    """The cheapest default search settings with recall@k of at least :data:`TUNE_TARGET` on a sample."""
    main, n = engine.main, len(vectors)
    if engine.exact or n == 0:
        return {}
    rng = np.random.default_rng(0)
    queries = vectors[rng.choice(n, min(sample, n), replace=False)]
    k = min(k, n - 1)
    if k < 1:
        return {}
    kth = _exact_kth(queries, vectors, k + 1)  # the queries are stored vectors: their own match is left out
    candidates = _candidates(main)
    best: dict[str, int] = {}
    reached = 0.0
    for refine in REFINE_DEPTHS:
        for setting in candidates:
            params = {**setting, **({"refine": refine} if refine > 1 else {})}
            recall = _recall(main, queries, vectors, kth, k, params)
            if recall >= TUNE_TARGET:
                return params
            best, reached = params, max(reached, recall)
        if not _lossy(main):
            break
    warnings.warn(
        f"no search setting of this index type reaches recall@{k} {RECALL_GOAL} on a sample of {len(queries)} "
        f"of its vectors (best {reached:.3f}, with {best}): its codes are too coarse for this collection. "
        "A larger memory budget (--memory-budget) gives a finer code",
        stacklevel=3,
    )
    return best


def _candidates(index: Any) -> list[dict[str, int]]:
    import faiss

    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        steps = [2**i for i in range(int(math.log2(ivf.nlist)) + 1)]
        return [{"nprobe": s} for s in steps]
    if _hnsw_of(index) is not None:
        return [{"efSearch": s} for s in (16, 32, 64, 128, 256, 512, 1024)]
    return [{}]


def _lossy(index: Any) -> bool:
    """Whether the index stores compressed codes (so re-ranking with the exact vectors helps)."""
    import faiss

    inner = _inner(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        return not isinstance(faiss.downcast_index(ivf), faiss.IndexIVFFlat)
    hnsw = _hnsw_of(index)
    storage = faiss.downcast_index(hnsw.storage) if hnsw is not None else inner
    return not isinstance(storage, faiss.IndexFlat)


def _recall(
    main: Any, queries: np.ndarray, vectors: np.ndarray, kth: np.ndarray, k: int, params: dict[str, int]
) -> float:
    import faiss

    refine = params.get("refine", 1)
    if "nprobe" in params:
        search_params = faiss.SearchParametersIVF(nprobe=params["nprobe"])
    elif "efSearch" in params:
        search_params = faiss.SearchParametersHNSW(efSearch=params["efSearch"])
    else:
        search_params = None
    scores, vids = _search(main, queries, (k + 1) * refine, search_params)
    # scored exactly even without re-ranking: a compressed index's own scores are estimates, which can pass
    # the exact threshold without the item being a true neighbour
    unique = np.unique(vids[vids >= 0])
    scores, vids = _rerank(queries, vids, unique, vectors[unique - 1], k + 1)
    return _recall_leaving_self_out(scores[:, : k + 1], kth, k)


def _recall_leaving_self_out(scores: np.ndarray, kth: np.ndarray, k: int) -> float:
    """Recall@k from (Q, k + 1) result scores of stored vectors as queries and the (k + 1)-th exact scores.

    One result at or above the threshold is the query's own item and is not counted.
    """
    found = np.sum(scores >= kth - 1e-5, axis=1) - 1  # (Q,)
    return float(np.mean(np.clip(found, 0, k) / k))


def _exact_kth(queries: np.ndarray, vectors: np.ndarray, k: int) -> np.ndarray:
    """(Q, 1) the k-th best exact score of each query."""
    best = np.full((len(queries), k), -np.inf, dtype=np.float32)
    for start in range(0, len(vectors), 100_000):
        block = queries @ vectors[start : start + 100_000].T
        best = -np.sort(-np.concatenate([best, block], axis=1), axis=1)[:, :k]
    return best[:, k - 1 : k]


def _search(index: Any, queries: np.ndarray, k: int, params: Any) -> tuple[np.ndarray, np.ndarray]:
    k = max(1, min(k, int(index.ntotal))) if index.ntotal else 0
    if k == 0:
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    return index.search(queries, k, params=params) if params is not None else index.search(queries, k)


def _exact_search(queries: np.ndarray, vids: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force top-k of ``queries`` over ``vectors`` (labelled ``vids``)."""
    if not len(vids):
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    scores = queries @ vectors.T  # (Q, n)
    k = min(k, len(vids))
    if k < len(vids):
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    else:
        top = np.tile(np.arange(len(vids)), (len(queries), 1))
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.argsort(-top_scores, axis=1, kind="stable")
    return np.take_along_axis(top_scores, order, axis=1), vids[np.take_along_axis(top, order, axis=1)]


def _rerank(
    queries: np.ndarray, vids: np.ndarray, unique: np.ndarray, vectors: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's candidates (``vids``, -1 for none) scored exactly with ``vectors`` (rows of ``unique``)."""
    position = {int(v): i for i, v in enumerate(unique)}
    scores = np.full(vids.shape, -np.inf, dtype=np.float32)
    for q in range(len(queries)):
        rows = [position[int(v)] for v in vids[q] if v >= 0]
        scores[q, : len(rows)] = vectors[rows] @ queries[q] if rows else scores[q, :0]
        vids[q, : len(rows)] = [int(v) for v in vids[q] if v >= 0]
        vids[q, len(rows) :] = -1
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(vids, order, axis=1)


def _merge(
    scores: np.ndarray, vids: np.ndarray, scores2: np.ndarray, vids2: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The best ``k`` of two result sets."""
    all_scores = np.concatenate([scores, np.where(vids2 >= 0, scores2, -np.inf)], axis=1)
    all_vids = np.concatenate([vids, vids2], axis=1)
    order = np.argsort(-all_scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, axis=1), np.take_along_axis(all_vids, order, axis=1)


def _snapshot_name(seq: int) -> str:
    return f"vectors-{seq:012d}.faiss"


def _latest_snapshot(path: Path) -> tuple[Path, int]:
    found = sorted((int(m.group(1)), p) for p in path.iterdir() if (m := SNAPSHOT.match(p.name)))
    if not found:
        raise IndexFormatError(
            f"{path} has no FAISS snapshot (vectors-*.faiss): "
            f"run `lipkit index repair {path}` to rebuild it from {DB_NAME}"
        )
    seq, snapshot = found[-1]
    return snapshot, seq


def _load_engine(snapshot: Path, mmap: bool) -> _Engine:
    import faiss

    try:
        index = faiss.read_index(str(snapshot), _mmap_flags(snapshot) if mmap else 0)
    except RuntimeError as exc:
        raise IndexFormatError(
            f"{snapshot} is damaged ({str(exc).strip().splitlines()[-1][:120]}): "
            f"run `lipkit index repair {snapshot.parent}` to rebuild it from {DB_NAME}"
        ) from None
    return _engine_of(index, mutable=not mmap)


def _mmap_flags(snapshot: Path) -> int:
    """FAISS's flags to map ``snapshot`` read-only: inverted lists for IVF files, flat codes for the rest.

    FAISS takes one mapping flag or the other, so the file's type tag (its first four bytes) decides.
    """
    import faiss

    with open(snapshot, "rb") as f:
        tag = f.read(4)
    kind = faiss.IO_FLAG_MMAP if tag.startswith(b"Iw") else faiss.IO_FLAG_MMAP_IFC
    return kind | faiss.IO_FLAG_READ_ONLY


def _write_snapshot(path: Path, index: Any, seq: int) -> None:
    """Write ``index`` as the snapshot of change ``seq`` (atomically), then remove older snapshots."""
    import faiss

    target = path / _snapshot_name(seq)
    atomic_write(target, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))
    for old in path.iterdir():
        match = SNAPSHOT.match(old.name)
        if match and int(match.group(1)) < seq:
            old.unlink(missing_ok=True)


def _drop_log(db: sqlite3.Connection, path: Path, seq: int) -> None:
    """Forget the logged changes that the snapshot of ``seq`` holds."""
    with _transaction(db):
        db.execute("DELETE FROM changes WHERE seq <= ?", (seq,))
        _set_info(db, {"log_start": seq})

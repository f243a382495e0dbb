"""The search index: exact and approximate search against brute force, live changes, filters, pages,
tombstones, durability under kills, concurrency, model records and errors."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lipkit.data.embeddings import ModelRecord
from lipkit.errors import FolderInUseError
from lipkit.index import store
from lipkit.index.errors import FilterError, IndexFormatError, ModelMismatchError, QueryError, UnknownKeyError
from lipkit.index.store import IndexPlan, SearchIndex, choose_index, nlist_for, parse_bytes

DIM = 16
RECORD = ModelRecord("a" * 64, DIM, "micro", None)
SOURCES = ("emoji", "tuxpaint", "photo")


def unit(rng: np.random.Generator, n: int, dim: int = DIM, clusters: int = 0) -> np.ndarray:
    """``n`` random unit vectors; around ``clusters`` centres when given (like real embeddings)."""
    x = rng.standard_normal((n, dim)).astype(np.float32)
    if clusters:
        centres = rng.standard_normal((clusters, dim)).astype(np.float32) * 3
        x = x + centres[rng.integers(0, clusters, n)]
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(n: int, start: int = 0) -> list[dict]:
    return [
        {"caption": f"item {i}", "source": SOURCES[i % 3], "width": (i * 37) % 500, "thumbnail": bytes([i % 256])}
        for i in range(start, start + n)
    ]


def keys(n: int, start: int = 0) -> list[str]:
    return [f"k{i}" for i in range(start, start + n)]


def brute_force(queries: np.ndarray, vectors: np.ndarray, names: list[str], k: int) -> list[list[str]]:
    scores = queries @ vectors.T
    return [[names[j] for j in np.argsort(-s, kind="stable")[:k]] for s in scores]


@pytest.fixture
def small(tmp_path):
    rng = np.random.default_rng(0)
    x = unit(rng, 300)
    index = SearchIndex.build(tmp_path / "ix", keys(300), x, rows(300), record=RECORD)
    yield index, x
    index.close()


def test_flat_search_equals_brute_force_numpy(small):
    index, x = small
    queries = unit(np.random.default_rng(1), 20)
    assert index.index_type == "IDMap2,Flat" and len(index) == 300
    hits = index.search(queries, 10)
    assert [[h.key for h in q] for q in hits] == brute_force(queries, x, keys(300), 10)
    exact = np.sort(queries @ x.T, axis=1)[:, ::-1][:, :10]
    np.testing.assert_allclose([[h.score for h in q] for q in hits], exact, atol=1e-5)
    first = hits[0][0]
    expected = {k: v for k, v in rows(300)[int(first.key[1:])].items() if k != "thumbnail"}
    assert first.metadata == expected  # without the thumbnail bytes
    assert first.id == int(first.key[1:]) + 1  # ids follow the build order


@pytest.mark.parametrize("factory", ["IVF32,Flat", "HNSW16", "IVF16,PQ4x4np"])
def test_approximate_types_meet_the_recall_goal_at_default_settings(tmp_path, factory):
    both = unit(np.random.default_rng(2), 3100, clusters=40)
    x, queries = both[:3000], both[3000:]  # queries from the same distribution, not in the index
    index = SearchIndex.build(tmp_path / "ix", keys(3000), x, rows(3000), record=RECORD, index_type=factory)
    assert index.index_type == factory and index.params  # tuned settings recorded in the index
    found = index.search(queries, 10)
    exact = brute_force(queries, x, keys(3000), 10)
    recall = np.mean([len({h.key for h in f} & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall >= store.RECALL_GOAL
    info = index.info(recall_sample=100)
    assert info["recall_at_10"] >= store.RECALL_GOAL and info["items"] == 3000 and info["index_type"] == factory
    assert info["bytes_per_vector"] > 0 and info["model"]["fingerprint"] == RECORD.fingerprint
    reopened = SearchIndex.open(tmp_path / "ix")
    assert reopened.params == index.params
    assert [[h.key for h in q] for q in reopened.search(queries, 10)] == [[h.key for h in q] for q in found]
    index.close()
    reopened.close()


def test_add_finds_delete_removes_upsert_replaces(small):
    index, x = small
    rng = np.random.default_rng(3)
    new = unit(rng, 5)
    assert index.add(keys(5, 1000), new, rows(5, 1000)) == 5
    hit = index.search(new[2], 1)[0][0]
    assert (hit.key, round(hit.score, 5)) == ("k1002", 1.0)
    assert index.delete(["k1002", "k0", "not-there"]) == 2
    assert not index.contains("k1002") and index.get(["k0", "k1"])[0] is None
    assert all(h.key not in ("k1002", "k0") for q in index.search(np.concatenate([new, x[:1]]), 50) for h in q)
    moved = unit(rng, 1)
    assert index.add(["k5"], moved, [{"caption": "moved", "source": "emoji"}]) == 1
    hit = index.search(moved, 1)[0][0]
    assert (hit.key, hit.metadata, round(hit.score, 5)) == ("k5", {"caption": "moved", "source": "emoji"}, 1.0)
    assert index.search(x[5], 1)[0][0].key != "k5" or index.search(x[5], 1)[0][0].score < 0.999
    np.testing.assert_allclose(index.vectors(["k5"])[0], moved[0], atol=1e-6)
    assert index.thumbnail("k5") is None and index.thumbnail("k7") == bytes([7])
    assert index.ids(["k5", "nope"]) == [6, None] and index.keys_for_ids([6, 10**9]) == ["k5", None]
    assert len(index) == 300 + 5 - 2 and index.check() == []


def test_a_key_given_twice_in_one_add_keeps_its_last_row(small):
    index, _ = small
    v = unit(np.random.default_rng(4), 2)
    assert index.add(["dup", "dup"], v, [{"caption": "first"}, {"caption": "last"}]) == 1
    assert index.get(["dup"]) == [{"caption": "last"}]
    np.testing.assert_allclose(index.vectors(["dup"])[0], v[1], atol=1e-6)


FILTERS = {
    "source = emoji": lambda m: m["source"] == "emoji",
    "source != tuxpaint": lambda m: m["source"] != "tuxpaint",
    "width >= 200": lambda m: m["width"] >= 200,
    "width < 50 and source in (emoji, photo)": lambda m: m["width"] < 50 and m["source"] in ("emoji", "photo"),
    "source not in (emoji) and width <= 100": lambda m: m["source"] != "emoji" and m["width"] <= 100,
    "key in (k3, k4, 'k5')": lambda m: m["key"] in ("k3", "k4", "k5"),
}


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "IVF16,Flat", "HNSW16"])
@pytest.mark.parametrize("exact_limit", [store.EXACT_FILTER_LIMIT, 0])  # 0: always through FAISS's selector
def test_filters_select_what_a_python_predicate_selects(tmp_path, monkeypatch, factory, exact_limit):
    monkeypatch.setattr(store, "EXACT_FILTER_LIMIT", exact_limit)
    both = unit(np.random.default_rng(5), 605, clusters=10)
    x, queries, meta = both[:600], both[600:], rows(600)
    index = SearchIndex.build(tmp_path / "ix", keys(600), x, meta, record=RECORD, index_type=factory)
    for where, predicate in FILTERS.items():
        chosen = [i for i in range(600) if predicate({**meta[i], "key": f"k{i}"})]
        everything = index.search(queries[:1], min(1000, 600), where=where)[0]
        if factory == "IDMap2,Flat" or exact_limit:  # exact: exactly the chosen rows, best first
            assert sorted(h.key for h in everything) == sorted(f"k{i}" for i in chosen), where
        top = index.search(queries, 10, where=where)
        assert all(predicate({**meta[int(h.key[1:])], "key": h.key}) for q in top for h in q), where
        expected = brute_force(queries, x[chosen], [f"k{i}" for i in chosen], 10)
        if factory == "IDMap2,Flat" or exact_limit:  # the exact top 10 of the chosen rows (ties in any order)
            best = -np.sort(-(queries @ x[chosen].T), axis=1)[:, :10]
            np.testing.assert_allclose([[h.score for h in q] for q in top], best, atol=1e-5, err_msg=where)
        else:  # approximate: most of the exact ones
            found = np.mean([len({h.key for h in f} & set(e)) / len(e) for f, e in zip(top, expected)])
            assert found >= 0.9, (where, found)
    index.close()


def test_filter_errors_are_one_clear_line(small):
    index, x = small
    with pytest.raises(FilterError, match=r"no column 'sorce'.*Did you mean: source"):
        index.search(x[0], 5, where="sorce = emoji")
    with pytest.raises(FilterError, match="holds numbers"):
        index.search(x[0], 5, where="width > wide")
    with pytest.raises(FilterError, match="expected 'and'"):
        index.search(x[0], 5, where="source = emoji or source = photo")
    assert index.search(x[0], 5, where="source = nothing") == [[]]
    assert index.columns() == {"caption": "text", "source": "text", "width": "number"}


def test_pages_concatenate_to_the_full_top_k(small):
    index, _ = small
    queries = unit(np.random.default_rng(6), 3)
    full = index.search(queries, 28, where="source != photo")
    pages = [index.search(queries, 7, offset=o, where="source != photo") for o in (0, 7, 14, 21)]
    for q in range(3):
        assert [h.key for page in pages for h in page[q]] == [h.key for h in full[q]]


@pytest.mark.parametrize(("k", "offset"), [(0, 0), (store.MAX_K + 1, 0), (10, -1), (10, store.MAX_DEPTH)])
def test_k_and_offset_out_of_range_are_refused(small, k, offset):
    index, x = small
    with pytest.raises(QueryError, match="out of range"):
        index.search(x[0], k, offset=offset)


def test_queries_of_another_width_unknown_keys_and_models_are_refused(small):
    index, _ = small
    with pytest.raises(QueryError, match="width 16"):
        index.search(np.ones((2, 8), np.float32), 5)
    with pytest.raises(UnknownKeyError, match="has no item 'nope'"):
        index.vectors(["k1", "nope"])
    with pytest.raises(UnknownKeyError, match="has no item 'nope'"):
        index.thumbnail("nope")
    other = ModelRecord("b" * 64, DIM, "micro", None)
    index.check_model(RECORD)
    index.check_model("a" * 64)
    with pytest.raises(ModelMismatchError, match=f"{'a' * 12}, not {'b' * 12}"):
        index.check_model(other)
    with pytest.raises(QueryError, match="expected \\(N, 16\\)"):
        index.add(["x"], np.ones((1, 8), np.float32), [{}])


def test_collapse_keeps_one_of_each_group_of_near_duplicates(tmp_path):
    rng = np.random.default_rng(7)
    base = unit(rng, 50)
    copies = base[:5] + 0.01 * unit(rng, 5)  # five near-copies of the first five
    x = np.concatenate([base, copies / np.linalg.norm(copies, axis=1, keepdims=True)])
    index = SearchIndex.build(tmp_path / "ix", keys(55), x, rows(55), record=RECORD)
    plain = index.search(base[0], 10)[0]
    assert [h.key for h in plain[:2]] in (["k0", "k50"], ["k50", "k0"])
    collapsed = index.search(base[0], 10, collapse=0.95)[0]
    assert len(collapsed) == 10 and collapsed[0].key == plain[0].key
    assert not ({"k0", "k50"} <= {h.key for h in collapsed})
    index.close()


def test_hnsw_deletes_are_tombstones_until_compact(tmp_path):
    rng = np.random.default_rng(8)
    x = unit(rng, 800, clusters=8)
    index = SearchIndex.build(tmp_path / "ix", keys(800), x, rows(800), record=RECORD, index_type="HNSW16")
    gone = keys(100)
    assert index.delete(gone) == 100
    index.add(["k100"], unit(rng, 1), [{"caption": "upserted"}])
    assert index.info(recall_sample=0)["tombstones"] == 101  # 100 deleted, 1 replaced
    hits = index.search(x[:100], 10)
    assert not {h.key for q in hits for h in q} & set(gone) and index.check() == []
    index.close()
    reopened = SearchIndex.open(tmp_path / "ix")  # the snapshot holds the dead vectors; they stay excluded
    assert reopened.info(recall_sample=0)["tombstones"] == 101 and reopened.check() == []
    before = [[h.key for h in q] for q in reopened.search(x[200:220], 5)]
    reopened.compact()
    info = reopened.info(recall_sample=100)
    assert info["tombstones"] == 0 and reopened.check() == [] and info["items"] == 700
    assert info["recall_at_10"] >= store.RECALL_GOAL
    after = [[h.key for h in q] for q in reopened.search(x[200:220], 5)]
    assert np.mean([len(set(a) & set(b)) / 5 for a, b in zip(after, before)]) >= 0.9
    reopened.close()


@pytest.mark.parametrize("factory", ["IVF8,Flat", "IDMap2,Flat"])
def test_memory_mapped_index_takes_live_changes_beside_it(tmp_path, factory):
    rng = np.random.default_rng(9)
    x = unit(rng, 500, clusters=5)
    SearchIndex.build(tmp_path / "ix", keys(500), x, rows(500), record=RECORD, index_type=factory).close()
    index = SearchIndex.open(tmp_path / "ix", mmap=True)
    new = unit(rng, 3)
    index.add(keys(3, 900), new, rows(3, 900))
    index.delete(["k1", "k900"])
    index.add(["k2"], new[2:3] * -1, [{"caption": "flipped"}])
    assert index.info(recall_sample=0)["memory_mapped"] and index.check() == []
    assert index.search(new[1], 1)[0][0].key == "k901"
    assert index.search(-new[2], 1)[0][0].key == "k2"
    assert not {h.key for h in index.search(x[1], 20)[0]} & {"k1", "k900"}
    index.compact()
    assert index.info(recall_sample=0)["tombstones"] == 0 and index.check() == [] and len(index) == 501
    assert index.search(new[1], 1)[0][0].key == "k901"
    index.close()


def test_another_process_sees_the_writers_changes_on_its_next_search(tmp_path, small):
    index, x = small
    reader = SearchIndex.open(index.path)
    v = unit(np.random.default_rng(10), 1)
    index.add(["fresh"], v, [{"caption": "fresh"}])
    index.delete(["k3"])
    assert reader.search(v, 1)[0][0].key == "fresh"
    assert reader.search(x[3], 1)[0][0].key != "k3"
    with pytest.raises(FolderInUseError):  # one writer at a time
        reader.delete(["k4"])
    reader.close()


def test_changes_survive_a_reopen_with_and_without_a_snapshot(small):
    index, _ = small
    v = unit(np.random.default_rng(11), 4)
    index.add(keys(4, 500), v, rows(4, 500))
    index.delete(["k10"])
    snapshot_before = sorted(p.name for p in index.path.glob("*.faiss"))
    reopened = SearchIndex.open(index.path)  # replays the log: no snapshot written yet
    assert sorted(p.name for p in index.path.glob("*.faiss")) == snapshot_before
    assert reopened.search(v[3], 1)[0][0].key == "k503" and not reopened.contains("k10") and reopened.check() == []
    reopened.close()
    index.save()
    assert sorted(p.name for p in index.path.glob("*.faiss")) != snapshot_before  # a newer snapshot replaced it
    assert len(list(index.path.glob("*.faiss"))) == 1
    index.close()
    again = SearchIndex.open(index.path)
    assert again.search(v[3], 1)[0][0].key == "k503" and again.check() == [] and len(again) == 303
    again.close()


def test_missing_or_damaged_files_say_which_and_what_to_do(tmp_path, small):
    index, x = small
    index.close()
    with pytest.raises(IndexFormatError, match="not a lipkit index \\(no such folder\\)"):
        SearchIndex.open(tmp_path / "nothing")
    (snapshot,) = index.path.glob("*.faiss")
    snapshot.write_bytes(b"garbage")
    with pytest.raises(IndexFormatError, match=f"{snapshot.name} is damaged.*lipkit index repair"):
        SearchIndex.open(index.path)
    snapshot.unlink()
    with pytest.raises(IndexFormatError, match=r"no FAISS snapshot.*lipkit index repair"):
        SearchIndex.open(index.path)
    repaired = SearchIndex.repair(index.path)
    assert repaired.check() == [] and [h.key for h in repaired.search(x[7], 1)[0]] == ["k7"]
    repaired.close()
    (index.path / "meta.sqlite").write_bytes(b"not a database at all" * 100)
    with pytest.raises(IndexFormatError, match=r"meta\.sqlite is damaged"):
        SearchIndex.open(index.path)
    with pytest.raises(IndexFormatError, match="already holds an index"):
        SearchIndex.build(index.path, ["a"], x[:1], [{}], record=RECORD)


class _PausingCount:
    """A connection whose item count, once taken, waits for ``go`` before handing the number back."""

    def __init__(self, conn, counted: threading.Event, go: threading.Event) -> None:
        self.conn, self.counted, self.go = conn, counted, go

    def execute(self, sql, *args):
        cursor = self.conn.execute(sql, *args)
        if "COUNT(*) FROM items" in sql:
            rows = cursor.fetchall()
            self.counted.set()
            self.go.wait(5)
            return _Rows(rows)
        return cursor

    def __getattr__(self, name):
        return getattr(self.conn, name)


class _Rows:
    def __init__(self, rows) -> None:
        self.rows = rows

    def fetchone(self):
        return self.rows[0]

    def fetchall(self):
        return self.rows


def test_a_count_taken_before_a_concurrent_delete_is_not_kept_after_it(small, monkeypatch):
    """``len`` counts lazily; a delete that lands between that count and its storing must not leave the
    pre-delete number behind (the delete waits for the count, then applies its change to it)."""
    index, _ = small
    counted, go = threading.Event(), threading.Event()
    monkeypatch.setattr(index, "_db", _PausingCount(index._db, counted, go))
    reader = index._reader
    monkeypatch.setattr(index, "_reader", lambda: _PausingCount(reader(), counted, go))
    assert index._count is None
    counter = threading.Thread(target=len, args=(index,))
    counter.start()
    assert counted.wait(5)
    deleter = threading.Thread(target=index.delete, args=(keys(4),))
    deleter.start()
    deleter.join(0.5)  # a delete that does not wait for the count finishes here, before the count is stored
    go.set()
    counter.join(5)
    deleter.join(5)
    assert not counter.is_alive() and not deleter.is_alive()
    assert len(index) == 296
    assert int(index._read("SELECT COUNT(*) FROM items")[0][0]) == 296


def test_several_threads_search_while_others_add_and_delete(small):
    index, x = small
    rng = np.random.default_rng(12)
    new = unit(rng, 120)
    errors: list[BaseException] = []
    stop = threading.Event()

    def searcher() -> None:
        while not stop.is_set():
            try:
                for q in index.search(x[:5], 10, where="source != photo"):
                    assert len(q) == 10
            except BaseException as exc:
                errors.append(exc)
                return

    def adder(part: int) -> None:
        for i in range(part * 40, part * 40 + 40, 4):
            index.add(keys(4, 1000 + i), new[i : i + 4], rows(4, 1000 + i))

    def deleter() -> None:
        for i in range(0, 120, 2):
            index.delete([f"k{i}"])

    searchers = [threading.Thread(target=searcher) for _ in range(3)]
    writers = [threading.Thread(target=adder, args=(p,)) for p in range(3)] + [threading.Thread(target=deleter)]
    for t in searchers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in searchers:
        t.join()
    assert not errors, errors[0]
    assert all(index.search(new[i], 1)[0][0].key == f"k{1000 + i}" for i in range(120))
    assert not any(index.contains(f"k{i}") for i in range(0, 120, 2)) and index.check() == []
    assert len(index) == 300 + 120 - 60


KILLED_WRITER = """
import sys, numpy as np
from lipkit.index.store import SearchIndex
index = SearchIndex.open(sys.argv[1])
rng = np.random.default_rng(int(sys.argv[2]))
batch = 0
print("ready", flush=True)
while True:
    keys = [f"b{sys.argv[2]}-{batch}-{i}" for i in range(40)] + ["k1", "k2"]
    x = rng.standard_normal((42, 16)).astype(np.float32)
    rows = [{"caption": f"batch {batch}", "batch": batch} for _ in keys]
    index.add(keys, x, rows)
    print(f"acked {batch}", flush=True)
    if batch % 3 == 2:
        index.save()
    batch += 1
"""


@pytest.mark.parametrize("factory", ["IDMap2,Flat", "HNSW16"])
def test_a_kill_during_add_leaves_a_usable_index_with_every_acknowledged_change(tmp_path, factory):
    rng = np.random.default_rng(13)
    x = unit(rng, 200)
    SearchIndex.build(tmp_path / "ix", keys(200), x, rows(200), record=RECORD, index_type=factory).close()
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    pick = random.Random(0)
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "ix"), str(attempt)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(pick.uniform(0.05, 0.6))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        acked = [int(line.split()[1]) for line in out.splitlines() if line.startswith("acked")]
        index = SearchIndex.open(tmp_path / "ix")
        assert index.check() == [], attempt
        present = [b for b in range(max(acked, default=-1) + 2) if index.contains(f"b{attempt}-{b}-0")]
        for b in present:  # each batch is all or nothing
            assert all(index.contains(f"b{attempt}-{b}-{i}") for i in range(40))
        assert set(acked) <= set(present) and present == list(range(len(present)))
        assert all(index.contains(k) for k in keys(200))  # nothing earlier was lost
        if present:
            assert index.get(["k1"])[0]["batch"] == present[-1]  # the upsert of the last batch holds
        index.close()


def test_choose_index_follows_size_and_memory_budget():
    assert choose_index(5_000, 512) == IndexPlan("IDMap2,Flat")
    assert nlist_for(1_000_000) == 4096 and nlist_for(100_000) == 1024 and nlist_for(20_000) == 512
    assert choose_index(1_000_000, 512, 8 * 2**30) == IndexPlan("IVF4096,Flat")
    assert choose_index(1_000_000, 512, 1 * 2**30) == IndexPlan("IVF4096,PQ64x8np")
    # above a million vectors the cells grow as the square root: 4,096 at 10M, 8,192 at 100M, 32,768 at 1B
    assert [nlist_for(n) for n in (2_000_000, 10_000_000, 100_000_000, 10**9)] == [4096, 4096, 8192, 32768]
    assert choose_index(10_000_000, 512, 2**29) == IndexPlan("IVF4096,PQ32x8np")
    assert choose_index(10_000_000, 512, 2**28) == IndexPlan("IVF4096,PQ16x8np")
    assert choose_index(10_000_000, 512, 2**20) == IndexPlan("IVF4096,PQ64x8np", mmap=True)
    assert parse_bytes("2GB") == 2 * 2**30 and parse_bytes("512MiB") == 2**29 and parse_bytes("1000") == 1000


def test_bad_factory_string_is_one_clear_line(tmp_path):
    x = unit(np.random.default_rng(14), 50)
    with pytest.raises(Exception, match="not a FAISS factory string"):
        SearchIndex.build(tmp_path / "ix", keys(50), x, rows(50), record=RECORD, index_type="Bogus12")
    assert not (Path(tmp_path) / "ix" / "meta.sqlite").exists()


def test_tuning_counts_a_compressed_index_hit_by_its_exact_score():
    # PQ scores are estimates: compared with the exact threshold they can count a non-neighbour as found
    import faiss

    x = unit(np.random.default_rng(5), 2000, clusters=20)
    index = faiss.index_factory(x.shape[1], "IVF4,PQ4x4np", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, np.arange(1, 2001, dtype=np.int64))
    queries, k = x[:50], 10
    kth = store._exact_kth(queries, x, k + 1)
    pq_scores, vids = index.search(queries, k + 1, params=faiss.SearchParametersIVF(nprobe=4))
    exact = np.einsum("qkd,qd->qk", x[vids - 1], queries)
    expected = np.mean(np.clip(np.sum(exact >= kth - 1e-5, axis=1) - 1, 0, k) / k)
    assert store._recall(index, queries, x, kth, k, {"nprobe": 4}) == pytest.approx(expected)
    assert store._recall_leaving_self_out(pq_scores, kth, k) > expected + 0.05  # what the estimates claimed


def test_tuning_that_cannot_reach_the_goal_says_so_and_keeps_the_widest_search(monkeypatch):
    # 10,000,000 synthetic vectors under a 256 MB budget (IVF4096,PQ16) reached 0.714 at best: the user is told
    import faiss

    x = unit(np.random.default_rng(6), 2000, clusters=20)
    index = faiss.index_factory(x.shape[1], "IVF4,PQ4x4np", faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add_with_ids(x, np.arange(1, 2001, dtype=np.int64))
    tried = []

    def recall(main, queries, vectors, kth, k, params):
        tried.append(params)
        return 0.25 + len(tried) / 100  # never the goal; the best is the last one tried

    monkeypatch.setattr(store, "_recall", recall)
    with pytest.warns(UserWarning, match=r"reaches recall@10 0.95 .*best 0\.\d+.*memory budget") as caught:
        params = store._tune(store._engine_of(index, mutable=True), x)
    assert params == {"nprobe": 4, "refine": store.REFINE_DEPTHS[-1]} == tried[-1]
    assert len(tried) == 3 * len(store.REFINE_DEPTHS)  # nprobe 1, 2, 4 at every re-ranking depth
    assert f"best {0.25 + len(tried) / 100:.3f}" in str(caught[0].message)

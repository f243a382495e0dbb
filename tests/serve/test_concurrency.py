"""Searches, adds and deletes from several clients at once: afterwards every added item is found and every
deleted item is gone."""

from __future__ import annotations

import threading

import httpx
import numpy as np
from serve_helpers import TOKEN, serve

AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_concurrent_search_add_delete(corpus, tmp_path):
    server, index = serve(corpus, tmp_path / "corpus")
    rng = np.random.default_rng(0)
    new = rng.normal(size=(60, corpus.vectors.shape[1])).astype(np.float32)
    new /= np.linalg.norm(new, axis=1, keepdims=True)
    errors: list[str] = []
    doomed = corpus.keys[:8]

    def searcher(seed: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(15):
                r = client.get("/api/indexes/corpus/search", params={"q": f"query {seed} {i}", "k": 5})
                if r.status_code != 200 or not r.json()["results"]:
                    errors.append(f"search {r.status_code} {r.text[:100]}")

    def adder(part: int) -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for i in range(part * 20, part * 20 + 20, 4):
                items = [{"key": f"new/{j}", "vector": new[j].tolist(), "source": "new"} for j in range(i, i + 4)]
                r = client.post("/api/indexes/corpus/items", json={"items": items}, headers=AUTH)
                if r.status_code != 200 or r.json()["added"] != 4:
                    errors.append(f"add {r.status_code} {r.text[:100]}")

    def deleter() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            for key in doomed:
                r = client.post("/api/indexes/corpus/items/delete", json={"keys": [key]}, headers=AUTH)
                if r.status_code != 200 or r.json()["deleted"] != 1:
                    errors.append(f"delete {r.status_code} {r.text[:100]}")

    with server:
        threads = [threading.Thread(target=searcher, args=(s,)) for s in range(4)]
        threads += [threading.Thread(target=adder, args=(p,)) for p in range(3)]
        threads.append(threading.Thread(target=deleter))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        with httpx.Client(base_url=server.url, timeout=30) as client:
            assert client.get("/healthz").json()["indexes"]["corpus"] == 24 + 60 - 8
            for j in range(60):
                r = client.post("/api/indexes/corpus/query", json={"terms": [{"vector": new[j].tolist()}], "k": 1})
                assert r.json()["results"][0]["key"] == f"new/{j}"
            for key in doomed:
                assert client.get("/api/indexes/corpus/item", params={"key": key}).status_code == 404
                r = client.get("/api/indexes/corpus/search", params={"q": "x", "k": 100, "where": "source = emoji"})
                assert key not in {hit["key"] for hit in r.json()["results"]}
    reopened = type(index).open(tmp_path / "corpus")  # the writes reached the disk
    assert len(reopened) == 76 and not reopened.contains(doomed[0]) and reopened.contains("new/59")

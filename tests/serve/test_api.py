"""The JSON API of `lipkit serve` over a real index, through a real server on loopback: every query kind,
items, thumbnails, writes behind the token, metrics, and every bad input answered with a clear 4xx."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from serve_helpers import TOKEN, LiveServer, build_index, jpeg_bytes, png_bytes, serve

from lipkit.index.store import SearchIndex

AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def live(corpus, tmp_path_factory):
    server, index = serve(corpus, tmp_path_factory.mktemp("api") / "corpus")
    with server, httpx.Client(base_url=server.url, timeout=30) as client:
        yield client, index


def keys_of(answer: dict) -> list[str]:
    return [hit["key"] for hit in answer["results"]]


def test_text_search_returns_what_the_index_returns_for_the_encoded_text(live, corpus):
    client, index = live
    answer = client.get("/api/indexes/corpus/search", params={"q": corpus.captions[3], "k": 5}).json()
    expected = index.search(corpus.encoder.encode_texts([corpus.captions[3]]), 5)[0]
    assert keys_of(answer) == [hit.key for hit in expected]
    assert [h["score"] for h in answer["results"]] == pytest.approx([hit.score for hit in expected], abs=1e-5)
    assert answer["next_offset"] == 5 and answer["results"][0]["thumbnail"].startswith("/api/indexes/corpus/thumbnail")


def test_more_like_this_returns_the_item_first_with_score_one(live, corpus):
    client, _ = live
    for i in (0, 13):
        answer = client.get("/api/indexes/corpus/similar", params={"key": corpus.keys[i], "k": 3}).json()
        first = answer["results"][0]
        assert first["key"] == corpus.keys[i] and first["score"] == pytest.approx(1.0, abs=1e-4)
        assert first["caption"] == corpus.captions[i] and first["source"] == corpus.sources[i]


def test_image_upload_finds_the_same_picture_first(live, corpus):
    client, _ = live
    files = {"file": ("stamp.png", png_bytes(corpus.images[14]), "image/png")}
    answer = client.post("/api/indexes/corpus/search/image", params={"k": 4}, files=files).json()
    assert answer["results"][0]["key"] == corpus.keys[14]
    assert answer["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_vector_query_weights_and_negative_terms(live, corpus):
    client, index = live
    own = corpus.vectors[5].tolist()
    answer = client.post("/api/indexes/corpus/query", json={"terms": [{"vector": own}], "k": 3}).json()
    assert keys_of(answer)[0] == corpus.keys[5]
    # key 5 minus key 6: what the index returns for that combination, computed here
    terms = [{"key": corpus.keys[5], "weight": 1.0}, {"key": corpus.keys[6], "weight": -0.5}]
    answer = client.post("/api/indexes/corpus/query", json={"terms": terms, "k": 4}).json()
    a, b = corpus.vectors[5], corpus.vectors[6]
    query = a / np.linalg.norm(a) - 0.5 * b / np.linalg.norm(b)
    expected = index.search((query / np.linalg.norm(query))[None].astype(np.float32), 4)[0]
    assert keys_of(answer) == [hit.key for hit in expected]
    # text plus image, base64
    image_b64 = base64.b64encode(png_bytes(corpus.images[2])).decode()
    terms = [{"text": "a red apple", "weight": 0.2}, {"image_b64": image_b64, "weight": 1.0}]
    answer = client.post("/api/indexes/corpus/query", json={"terms": terms, "k": 2}).json()
    assert len(answer["results"]) == 2


def test_filters_pagination_and_collapsing(live, corpus):
    client, _ = live
    params = {"q": "a picture", "k": 30, "where": "source = tuxpaint"}
    answer = client.get("/api/indexes/corpus/search", params=params).json()
    assert {h["source"] for h in answer["results"]} == {"tuxpaint"} and len(answer["results"]) == 12
    assert answer["next_offset"] is None
    everything = keys_of(client.get("/api/indexes/corpus/search", params={"q": "a picture", "k": 24}).json())
    pages = [
        client.get("/api/indexes/corpus/search", params={"q": "a picture", "k": 8, "offset": o}).json()
        for o in (0, 8, 16)
    ]
    assert [key for p in pages for key in keys_of(p)] == everything
    collapsed = client.get("/api/indexes/corpus/search", params={"q": "a picture", "k": 24, "collapse": 0.5}).json()
    assert 1 <= len(collapsed["results"]) < 24  # the tiny random model's vectors are all alike


def test_items_thumbnails_health_and_listing(live, corpus):
    client, _ = live
    item = client.get("/api/indexes/corpus/item", params={"key": corpus.keys[1]}).json()
    assert item["caption"] == corpus.captions[1] and item["metadata"]["width"] == corpus.images[1].width
    thumb = client.get("/api/indexes/corpus/thumbnail", params={"key": corpus.keys[1]})
    assert thumb.headers["content-type"] == "image/jpeg"
    assert max(Image.open(io.BytesIO(thumb.content)).size) == 160 or max(corpus.images[1].size) < 160
    listing = client.get("/api/indexes").json()["indexes"]
    assert [(i["name"], i["size"], i["embed_dim"]) for i in listing] == [("corpus", 24, 64)]
    assert client.get("/healthz").json() == {"status": "ok", "indexes": {"corpus": 24}}
    page = client.get("/")
    assert page.status_code == 200 and 'id="search-form"' in page.text
    assert client.get("/static/app.js").status_code == 200


def test_add_and_delete_need_the_token(live, corpus):
    client, _ = live
    item = {"key": "added/one", "vector": corpus.vectors[7].tolist(), "caption": "added item", "source": "test"}
    body = {"items": [item]}
    assert client.post("/api/indexes/corpus/items", json=body).status_code == 401
    wrong = client.post("/api/indexes/corpus/items", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 403 and wrong.json()["error"] == "wrong_token"
    added = client.post("/api/indexes/corpus/items", json=body, headers=AUTH).json()
    assert added["added"] == 1 and added["size"] == 25
    found = client.get("/api/indexes/corpus/item", params={"key": "added/one"}).json()
    assert found["caption"] == "added item" and found["source"] == "test"
    image_item = {"key": "added/two", "image_b64": base64.b64encode(jpeg_bytes(corpus.images[0])).decode()}
    assert client.post("/api/indexes/corpus/items", json={"items": [image_item]}, headers=AUTH).json()["added"] == 1
    assert client.get("/api/indexes/corpus/thumbnail", params={"key": "added/two"}).status_code == 200
    keys = {"keys": ["added/one", "added/two", "never/there"]}
    assert client.post("/api/indexes/corpus/items/delete", json=keys).status_code == 401
    deleted = client.post("/api/indexes/corpus/items/delete", json=keys, headers=AUTH).json()
    assert deleted["deleted"] == 2 and deleted["size"] == 24
    assert client.get("/api/indexes/corpus/item", params={"key": "added/one"}).status_code == 404


def test_metrics_count_requests_and_batches(live):
    client, _ = live
    client.get("/api/indexes/corpus/search", params={"q": "metrics"})
    text = client.get("/metrics").text
    assert 'lipkit_http_requests_total{method="GET",route="/api/indexes/{index}/search",status="200"}' in text
    assert 'lipkit_batch_size_count{index="corpus",kind="text"}' in text
    assert 'lipkit_batch_size_count{index="corpus",kind="search"}' in text
    assert "lipkit_http_request_seconds_bucket" in text


def test_the_spec_lists_the_search_parameters_the_route_reads(live):
    client, _ = live
    operation = client.get("/openapi.json").json()["paths"]["/api/indexes/{index}/search"]["get"]
    params = {p["name"]: p for p in operation["parameters"]}
    assert set(params) == {"index", "q", "k", "offset", "where", "collapse"}
    assert params["q"]["required"] and params["k"]["schema"]["maximum"] == 500


BAD_REQUESTS = [
    # (method, path, keyword arguments, status, error code)
    ("get", "/api/indexes/nope/search", {"params": {"q": "x"}}, 404, "not_found"),
    ("get", "/api/indexes/corpus/similar", {"params": {"key": "no/such/key"}}, 404, "not_found"),
    ("get", "/api/indexes/corpus/item", {"params": {"key": "no/such/key"}}, 404, "not_found"),
    ("get", "/api/indexes/corpus/thumbnail", {"params": {"key": "../../../../etc/passwd"}}, 404, "not_found"),
    ("get", "/api/indexes/corpus/thumbnail", {"params": {"key": "/etc/passwd"}}, 404, "not_found"),
    ("get", "/api/indexes/..%2F..%2Fetc/thumbnail", {"params": {"key": "x"}}, 404, "not_found"),
    ("get", "/api/indexes/corpus/search", {"params": {"q": "x" * 1001}}, 422, "invalid_request"),
    ("get", "/api/indexes/corpus/search", {"params": {"q": ""}}, 422, "invalid_request"),
    ("get", "/api/indexes/corpus/search", {"params": {"q": "x", "k": 0}}, 422, "invalid_request"),
    ("get", "/api/indexes/corpus/search", {"params": {"q": "x", "k": 501}}, 422, "invalid_request"),
    ("get", "/api/indexes/corpus/search", {"params": {"q": "x", "k": "ten"}}, 422, "invalid_request"),
    ("get", "/api/indexes/corpus/search", {"params": {"q": "x", "offset": -1}}, 422, "invalid_request"),
    ("get", "/api/indexes/corpus/search", {"params": {"k": "3"}}, 422, "invalid_request"),
    ("get", "/api/indexes/corpus/search", {"params": {"q": "x", "collapse": "nan"}}, 422, "invalid_request"),
    ("get", "/api/indexes/corpus/similar", {"params": {"key": "x", "k": "0"}}, 422, "invalid_request"),
    (
        "post",
        "/api/indexes/corpus/search/image?collapse=2",
        {"files": {"file": ("a.png", b"", "image/png")}},
        422,
        "invalid_request",
    ),
    ("get", "/api/indexes/corpus/search", {"params": {"q": "x", "where": "colour = red"}}, 400, "bad_filter"),
    ("get", "/api/indexes/corpus/search", {"params": {"q": "x", "where": "source ="}}, 400, "bad_filter"),
    (
        "post",
        "/api/indexes/corpus/query",
        {"content": b"{not json", "headers": {"content-type": "application/json"}},
        422,
        "invalid_request",
    ),
    ("post", "/api/indexes/corpus/query", {"json": {"terms": []}}, 422, "invalid_request"),
    ("post", "/api/indexes/corpus/query", {"json": {"terms": [{"text": "a", "key": "b"}]}}, 422, "invalid_request"),
    ("post", "/api/indexes/corpus/query", {"json": {"terms": [{"vector": [1.0, 2.0]}]}}, 422, "wrong_dimension"),
    ("post", "/api/indexes/corpus/query", {"json": {"terms": [{"text": "a"}], "k": "5"}}, 422, "invalid_request"),
    ("post", "/api/indexes/corpus/query", {"json": {"terms": [{"image_b64": "not base64!"}]}}, 422, "invalid_base64"),
    (
        "post",
        "/api/indexes/corpus/query",
        {"json": {"terms": [{"text": "a", "weight": 1}, {"text": "a", "weight": -1}]}},
        400,
        "bad_query",
    ),
    (
        "post",
        "/api/indexes/corpus/search/image",
        {"files": {"file": ("a.txt", b"hello, not an image", "text/plain")}},
        415,
        "not_an_image",
    ),
    ("post", "/api/indexes/corpus/search/image", {"files": {"file": ("a.png", b"", "image/png")}}, 415, "not_an_image"),
    ("post", "/api/indexes/corpus/search/image", {"data": {"k": "3"}}, 422, "invalid_request"),
    ("post", "/api/indexes/corpus/items", {"json": {"items": [{"key": "k", "vector": [1.0]}]}}, 401, "no_token"),
    (
        "post",
        "/api/indexes/corpus/items/delete",
        {"json": {"keys": ["x"]}, "headers": {"Authorization": "Bearer wrong"}},
        403,
        "wrong_token",
    ),
    ("get", "/api/no/such/route", {}, 404, "not_found"),
    (
        "post",
        "/api/indexes/corpus/items",
        {"json": {"items": [{"key": "k", "vector": [1.0] * 64, "metadata": {"thumbnail": "x"}}]}, "headers": AUTH},
        422,
        "reserved_column",
    ),
]


@pytest.mark.parametrize(("method", "path", "kwargs", "status", "code"), BAD_REQUESTS)
def test_bad_inputs_get_a_clear_4xx_and_the_server_keeps_serving(live, corpus, method, path, kwargs, status, code):
    client, _ = live
    answer = getattr(client, method)(path, **kwargs)
    assert answer.status_code == status, answer.text
    body = answer.json()
    assert body["error"] == code and body["detail"]
    assert client.get("/api/indexes/corpus/search", params={"q": "still there", "k": 2}).status_code == 200


def test_uploads_over_the_limit_are_refused(live, corpus):
    client, _ = live
    big = b"\x89PNG" + bytes(11 * 1024 * 1024)
    answer = client.post("/api/indexes/corpus/search/image", files={"file": ("big.png", big, "image/png")})
    assert answer.status_code == 413 and answer.json()["error"] == "too_large"
    huge = Image.new("RGB", (9000, 9000))  # 81 M pixels, a few kB as PNG
    answer = client.post("/api/indexes/corpus/search/image", files={"file": ("bomb.png", png_bytes(huge), "image/png")})
    assert answer.status_code == 413 and "pixels" in answer.json()["detail"]
    assert client.get("/api/indexes/corpus/similar", params={"key": corpus.keys[0], "k": 1}).status_code == 200


def test_a_smaller_upload_limit_applies(corpus, tmp_path):
    from lipkit.serve.limits import Limits

    server, _ = serve(corpus, tmp_path / "corpus", limits=Limits(max_upload_bytes=2000))
    with server, httpx.Client(base_url=server.url) as client:
        files = {"file": ("a.png", png_bytes(corpus.images[0]), "image/png")}
        assert len(files["file"][1]) > 2000
        assert client.post("/api/indexes/corpus/search/image", files=files).status_code == 413
        small = png_bytes(Image.new("RGB", (8, 8), "red"))
        assert (
            client.post("/api/indexes/corpus/search/image", files={"file": ("s.png", small, "image/png")}).status_code
            == 200
        )


def test_several_indexes_side_by_side_and_a_foreign_model_refused(corpus, tmp_path):
    import torch

    from lipkit.index.encoder import QueryEncoder
    from lipkit.index.errors import ModelMismatchError
    from lipkit.models import create_model
    from lipkit.serve.app import create_app

    torch.manual_seed(1)
    other = QueryEncoder(create_model("micro"), "cpu")  # same config, other weights: another model
    vectors = other.encode_images(corpus.images[:5])
    metadata = [{"caption": c, "source": s} for c, s in zip(corpus.captions[:5], corpus.sources[:5], strict=True)]
    second = SearchIndex.build(tmp_path / "second", corpus.keys[:5], vectors, metadata, record=other.record)
    first = build_index(corpus, tmp_path / "first")
    with pytest.raises(ModelMismatchError, match="was built with model"):
        create_app({"first": (first, other)})
    app = create_app({"first": (first, corpus.encoder), "second": (second, other)})
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as client:
        names = [(i["name"], i["size"]) for i in client.get("/api/indexes").json()["indexes"]]
        assert names == [("first", 24), ("second", 5)]
        for name, vector in (("first", corpus.vectors[6]), ("second", vectors[2])):
            body = {"terms": [{"vector": vector.tolist()}], "k": 1}
            answer = client.post(f"/api/indexes/{name}/query", json=body).json()
            assert answer["index"] == name and answer["results"][0]["key"] == corpus.keys[6 if name == "first" else 2]


def test_the_text_search_fast_path_answers_as_the_fastapi_route(corpus, tmp_path, monkeypatch):
    # GET .../search is answered by a middleware in front of FastAPI's routing; the same app without it
    # (the request then reaches the FastAPI route) must give the same status and body, CORS and metrics included
    from fastapi.testclient import TestClient

    from lipkit.serve.app import TextSearchFastPath, create_app

    index = build_index(corpus, tmp_path / "ix")
    origin = "http://example.org"
    fast = create_app({"corpus": (index, corpus.encoder)}, cors_origins=[origin])
    plain = create_app({"corpus": (index, corpus.encoder)}, cors_origins=[origin])
    plain.user_middleware = [m for m in plain.user_middleware if m.cls is not TextSearchFastPath]
    taken: list[str | None] = []
    index_of = TextSearchFastPath._index

    def index_seen(self, scope):
        if scope["type"] == "http":
            taken.append(index_of(self, scope))
        return index_of(self, scope)

    monkeypatch.setattr(TextSearchFastPath, "_index", index_seen)
    cases = [
        ("/api/indexes/corpus/search", {"q": corpus.captions[2], "k": 3}),
        ("/api/indexes/corpus/search", [("q", "first"), ("q", corpus.captions[5]), ("k", "2")]),  # the last q
        ("/api/indexes/corpus/search", {"q": "ünïcödé ☃", "where": "source = emoji", "offset": 1}),
        ("/api/indexes/corpus/search", {"q": "x", "k": "0"}),
        ("/api/indexes/corpus/search", {"q": ""}),
        ("/api/indexes/corpus/search", {"q": "x", "where": "nonsense ==="}),
        ("/api/indexes/nowhere/search", {"q": "x"}),
        ("/api/indexes/a%2Fb/search", {"q": "x"}),
    ]
    with TestClient(fast) as a, TestClient(plain) as b:
        for path, params in cases:
            ra = a.get(path, params=params, headers={"Origin": origin})
            rb = b.get(path, params=params, headers={"Origin": origin})
            assert (ra.status_code, ra.json()) == (rb.status_code, rb.json()), path
            assert ra.headers["access-control-allow-origin"] == origin
            assert ra.headers["content-type"] == rb.headers["content-type"] == "application/json"
        # the fast app took every request but the one whose index name holds a slash; the plain app none
        assert taken == ["corpus"] * 6 + ["nowhere", None]
        statuses = {r.status_code for r in (a.get(p, params=q) for p, q in cases)}
        assert statuses == {200, 400, 404, 422}
        assert 'route="/api/indexes/{index}/search",status="422"' in a.get("/metrics").text
    index.close()

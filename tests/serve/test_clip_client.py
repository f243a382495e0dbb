"""clip-retrieval's own Python client, unchanged, against `lipkit serve`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import httpx
import pytest
from serve_helpers import png_bytes, serve


def load_clip_client():
    """clip_retrieval/clip_client.py loaded by file path: the package's __init__ needs Flask, the client does not."""
    spec = importlib.util.find_spec("clip_retrieval")
    path = Path(spec.submodule_search_locations[0]) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_client_under_test", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def live(corpus, tmp_path_factory):
    server, index = serve(corpus, tmp_path_factory.mktemp("clip") / "corpus")
    with server:
        yield server.url, index


def client(url: str, **options):
    module = load_clip_client()
    return module.ClipClient(f"{url}/knn-service", indice_name="corpus", **options)


def test_text_query(live, corpus):
    url, index = live
    results = client(url, num_images=5, deduplicate=False).query(text=corpus.captions[4])
    expected = index.search(corpus.encoder.encode_texts([corpus.captions[4]]), 5)[0]
    assert [r["key"] for r in results] == [hit.key for hit in expected]
    assert all(isinstance(r["id"], int) and r["url"].startswith(url) for r in results)
    assert {r["caption"] for r in results} <= set(corpus.captions)


def test_image_query_by_file(live, corpus, tmp_path):
    url, _ = live
    path = tmp_path / "query.png"
    path.write_bytes(png_bytes(corpus.images[16]))
    results = client(url, num_images=3, deduplicate=False).query(image=str(path))
    assert results[0]["key"] == corpus.keys[16] and results[0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert results[0]["caption"] == corpus.captions[16]


def test_embedding_query_returns_the_item_first(live, corpus):
    url, _ = live
    results = client(url, num_images=4, deduplicate=False).query(embedding_input=corpus.vectors[9].tolist())
    assert results[0]["key"] == corpus.keys[9] and results[0]["similarity"] == pytest.approx(1.0, abs=1e-5)


def test_unapplied_flags_are_named_and_dedup_applies(live, corpus):
    url, _ = live
    # ClipClient's defaults ask for the safety model, the violence detector, aesthetics and dedup
    results = client(url, num_images=10).query(embedding_input=corpus.vectors[0].tolist())
    assert results[0]["not_applied"] == [
        "use_safety_model",
        "use_violence_detector",
        "aesthetic_score",
        "aesthetic_weight",
    ]
    assert 1 <= len(results) < 10  # the tiny random model's vectors are near-duplicates at 0.94


def test_indices_list_metadata_and_refused_url(live, corpus):
    url, _ = live
    assert httpx.get(f"{url}/indices-list").json() == ["corpus"]
    body = {
        "embedding_input": corpus.vectors[2].tolist(),
        "num_images": 1,
        "num_result_ids": 6,
        "indice_name": "corpus",
    }
    results = httpx.post(f"{url}/knn-service", content=str(body).replace("'", '"')).json()  # no content type
    assert len(results) == 6 and "caption" in results[0] and "caption" not in results[5]
    ids = [r["id"] for r in results[1:]] + [12345]
    metadata = httpx.post(f"{url}/metadata", content=f'{{"ids": {ids}, "indice_name": "corpus"}}').json()
    assert [m["id"] for m in metadata] == ids and metadata[-1]["metadata"] is None
    assert {m["metadata"]["key"] for m in metadata[:-1]} <= set(corpus.keys)
    refused = client(url).query(image="http://example.com/cat.jpg")
    assert refused["error"] == "image_url_refused"
    assert httpx.post(f"{url}/knn-service", content=b"{oops").status_code == 422

"""clip-retrieval's back-end API on the lipkit server, so that its clients work unchanged.

clip-retrieval's ``ClipClient`` and its web front end call three routes: ``GET /indices-list`` (the index
names), ``POST /knn-service`` (a search by text, base64 image, image URL or embedding) and ``POST /metadata``
(the metadata of result ids, for infinite scroll). Their bodies are JSON sent without a JSON content type,
so the routes read the body whatever its declared type, as clip-retrieval's Flask back end does.

Differences, each named in the answer (header ``X-Lipkit-Not-Applied`` and a ``not_applied`` field per
result) when a request asks for them:

- ``use_safety_model``, ``use_violence_detector``, ``aesthetic_score``/``aesthetic_weight`` and ``use_mclip``
  are accepted but not applied: lipkit has no such models.
- ``image_url`` is refused (400): fetching any URL a client names would let clients make the server reach
  hosts that only it can reach. Send the image itself as base64 in ``image``.
- ``deduplicate`` collapses results more similar than clip-retrieval's own 0.94 (cosine).
- Result ids are the index's stable integer item ids; each result also carries its ``key``.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lipkit.serve.images import decode_base64_image
from lipkit.serve.limits import ApiError, Limits, error_responses
from lipkit.serve.service import IndexService, SearchOptions

if TYPE_CHECKING:
    from lipkit.serve.service import Served

DEDUP_THRESHOLD = 0.94  # clip-retrieval's own threshold for "deduplicate"
NOT_APPLIED_HEADER = "X-Lipkit-Not-Applied"


def make_knn_request(limits: Limits) -> type[BaseModel]:
    """The body of ``/knn-service`` (the fields clip-retrieval's clients send)."""

    class KnnRequest(BaseModel):
        """A clip-retrieval query: one of text, image (base64), image_url or embedding_input."""

        model_config = ConfigDict(extra="ignore")
        text: str | None = Field(None, max_length=limits.max_text_chars)
        image: str | None = Field(None, max_length=limits.max_body_bytes)
        image_url: str | None = Field(None, max_length=4096)
        embedding_input: list[float] | None = Field(None, max_length=65536)
        modality: Literal["image", "text"] = "image"
        num_images: int = Field(40, ge=1, le=limits.max_k, strict=True)
        num_result_ids: int | None = Field(None, ge=1, le=100_000, strict=True)
        indice_name: str | None = Field(None, max_length=64)
        deduplicate: bool = Field(False, strict=True)
        use_mclip: bool = Field(False, strict=True)
        use_safety_model: bool = Field(False, strict=True)
        use_violence_detector: bool = Field(False, strict=True)
        aesthetic_score: int | str | None = None
        aesthetic_weight: float | str | None = None

    return KnnRequest


class MetadataRequest(BaseModel):
    """The body of ``/metadata``."""

    model_config = ConfigDict(extra="ignore")
    ids: list[Annotated[int, Field(ge=-(2**63), le=2**63 - 1, strict=True)]] = Field(max_length=100_000)
    indice_name: str | None = Field(None, max_length=64)


def not_applied(body: BaseModel) -> list[str]:
    """The options a request asked for that lipkit does not apply."""
    asked = {
        "use_safety_model": getattr(body, "use_safety_model", False),
        "use_violence_detector": getattr(body, "use_violence_detector", False),
        "use_mclip": getattr(body, "use_mclip", False),
        "aesthetic_score": getattr(body, "aesthetic_score", None) not in (None, ""),
        "aesthetic_weight": getattr(body, "aesthetic_weight", None) not in (None, ""),
    }
    return [name for name, on in asked.items() if on]


async def read_json(request: Request, model: type[BaseModel]) -> Any:
    """The request body parsed as JSON whatever its content type, then validated.

    Raises:
        ApiError: 422 for a body that is not JSON or does not fit ``model``.
    """
    raw = await request.body()
    try:
        return model.model_validate(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise ApiError(422, "invalid_json", f"the body is not JSON: {exc}") from None
    except UnicodeDecodeError:
        raise ApiError(422, "invalid_json", "the body is not UTF-8 JSON") from None
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:5]]
        raise ApiError(422, "invalid_request", "; ".join(parts)) from None


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI ``requestBody`` of a route that reads its body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def add_clip_retrieval_routes(app: FastAPI, served: Served) -> None:
    """Add ``/indices-list``, ``/knn-service`` and ``/metadata`` to ``app``."""
    limits = served.limits
    KnnRequest = make_knn_request(limits)

    def pick(name: str | None) -> tuple[str, IndexService]:
        chosen = name or next(iter(served.services))
        return chosen, served.service(chosen)

    @app.get("/indices-list", response_model=list[str], tags=["clip-retrieval"])
    async def indices_list() -> list[str]:
        """The index names (clip-retrieval's ``/indices-list``)."""
        return list(served.services)

    @app.post(
        "/knn-service",
        response_model=list[dict[str, Any]],
        openapi_extra=json_body(KnnRequest),
        responses=error_responses(400, 404, 413, 415, 422),
        tags=["clip-retrieval"],
    )
    async def knn_service(request: Request) -> JSONResponse:
        """Search as clip-retrieval's ``/knn-service`` does: by text, base64 image or embedding."""
        body = await read_json(request, KnnRequest)
        name, service = pick(body.indice_name)
        if body.modality != service.index.modality:
            raise ApiError(400, "wrong_modality", f"index {name!r} holds {service.index.modality} embeddings")
        vector = await _query_vector(service, body, limits)
        wanted = min(body.num_result_ids or body.num_images, limits.max_k)
        options = SearchOptions(k=max(wanted, body.num_images), collapse=DEDUP_THRESHOLD if body.deduplicate else None)
        hits = await service.search(vector, options)
        skipped = not_applied(body)
        results = [_result(request, name, hit, i < body.num_images) for i, hit in enumerate(hits)]
        if skipped:
            for result in results:
                result["not_applied"] = skipped
        headers = {NOT_APPLIED_HEADER: ", ".join(skipped)} if skipped else None
        return JSONResponse(results, headers=headers)

    @app.post(
        "/metadata",
        response_model=list[dict[str, Any]],
        openapi_extra=json_body(MetadataRequest),
        responses=error_responses(404, 413, 422),
        tags=["clip-retrieval"],
    )
    async def metadata(request: Request) -> list[dict[str, Any]]:
        """The metadata of result ids (clip-retrieval's ``/metadata``); unknown ids get null metadata."""
        body = await read_json(request, MetadataRequest)
        name, service = pick(body.indice_name)
        keys = await service.keys_for_ids(body.ids)
        known = [key for key in keys if key is not None]
        by_key = dict(zip(known, await service.items(known), strict=True))
        return [
            {"id": item_id, "metadata": _metadata(request, name, key, by_key.get(key)) if key else None}
            for item_id, key in zip(body.ids, keys, strict=True)
        ]


async def _query_vector(service: IndexService, body: Any, limits: Limits) -> Any:
    if body.image_url is not None and not body.text and body.image is None and body.embedding_input is None:
        raise ApiError(
            400, "image_url_refused", "this server does not fetch image URLs; send the image as base64 in 'image'"
        )
    if body.text:
        return await service.text_vector(body.text)
    if body.image is not None:
        return await service.image_vector(decode_base64_image(body.image, limits))
    if body.embedding_input is not None:
        return service.check_vector(body.embedding_input)
    raise ApiError(422, "empty_query", "give one of text, image (base64) or embedding_input")


def _result(request: Request, index: str, hit: Any, with_metadata: bool) -> dict[str, Any]:
    result: dict[str, Any] = {"id": hit.id, "similarity": float(hit.score)}
    if with_metadata:
        result |= _metadata(request, index, hit.key, hit.metadata) or {}
    return result


def _metadata(request: Request, index: str, key: str, metadata: dict[str, Any] | None) -> dict[str, Any] | None:
    """An item's metadata in clip-retrieval's shape: ``caption``, ``url`` (the thumbnail here), and the rest."""
    if metadata is None:
        return None
    from lipkit.serve.service import thumbnail_url

    scalars = {k: v for k, v in metadata.items() if isinstance(v, (str, int, float, bool)) and k != "thumbnail"}
    url = metadata.get("url") or str(request.base_url).rstrip("/") + thumbnail_url(index, key)
    return scalars | {"key": key, "caption": metadata.get("caption"), "url": url}

"""The search server: a FastAPI app over one or more indexes, each with the model that made it.

Routes (``{index}`` is an index's name; the OpenAPI spec is at ``/openapi.json``, its page at ``/docs``):

- ``GET /api/indexes``: the served indexes.
- ``GET /api/indexes/{index}/search?q=TEXT``: text search. ``k``, ``offset``, ``where`` and ``collapse`` work on
  every search route.
- ``POST /api/indexes/{index}/search/image``: search by an uploaded image (multipart field ``file``).
- ``GET /api/indexes/{index}/similar?key=KEY``: more like an indexed item.
- ``POST /api/indexes/{index}/query``: weighted terms (text, key, base64 image, vector; negative weights allowed).
- ``GET /api/indexes/{index}/item?key=KEY`` and ``.../thumbnail?key=KEY``: an item's metadata and thumbnail.
- ``POST /api/indexes/{index}/items`` and ``.../items/delete``: add and delete, with ``Authorization: Bearer TOKEN``.
- ``/healthz``, ``/metrics`` (Prometheus), the web page at ``/``, and clip-retrieval's API (:mod:`.clip_retrieval`).
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures, whose types are local names.
import contextlib
import hmac
import re
from collections.abc import AsyncIterator, Mapping
from importlib import resources
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import parse_qsl

from fastapi import Depends, FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from lipkit import __version__
from lipkit.errors import LipkitError
from lipkit.serve import schemas
from lipkit.serve.images import decode_base64_image, decode_image, thumbnail_jpeg
from lipkit.serve.limits import ApiError, Limits, error_responses
from lipkit.serve.metrics import Metrics, MetricsMiddleware
from lipkit.serve.middleware import BodyLimit
from lipkit.serve.params import SearchParams
from lipkit.serve.service import IndexService, NewItem, SearchOptions, Served, Term, thumbnail_url

if TYPE_CHECKING:
    from lipkit.index.encoder import QueryEncoder
    from lipkit.index.store import Hit, SearchIndex

INDEX_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
STATIC = resources.files("lipkit.serve") / "static"


def create_app(
    indexes: "dict[str, tuple[SearchIndex, QueryEncoder]]",
    *,
    token: str | None = None,
    limits: Limits | None = None,
    cors_origins: list[str] | None = None,
) -> FastAPI:
    """The search app over ``indexes``.

    Args:
        indexes: Index name -> (the index, the encoder of its model); the first is the default.
        token: The bearer token that add and delete need; None turns writes off.
        limits: Request limits (defaults: :class:`Limits`).
        cors_origins: Web origins allowed to call the API from a browser (clip-retrieval's hosted front end,
            for one); none by default, so other web pages cannot read a local index.

    Raises:
        LipkitError: No index, a bad index name, or an encoder whose model did not make its index.
    """
    limits = limits or Limits()
    if not indexes:
        raise LipkitError("nothing to serve: give at least one index")
    metrics = Metrics()
    services = {name: _service(name, index, encoder, limits, metrics) for name, (index, encoder) in indexes.items()}
    served = Served(services, limits, token, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for service in services.values():
            await service.aclose()

    app = FastAPI(title="lipkit search", version=__version__, lifespan=lifespan)
    app.state.served = served
    _add_error_handlers(app)
    params = SearchParams(limits)  # the page, filter and text, read from the query string (see .params)
    _add_search_routes(app, served, params)
    _add_item_routes(app, served)
    _add_system_routes(app, served)
    from lipkit.serve.clip_retrieval import add_clip_retrieval_routes

    add_clip_retrieval_routes(app, served)
    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")
    text_route = next(r for r in app.routes if getattr(r, "path", "") == "/api/indexes/{index}/search")
    app.add_middleware(TextSearchFastPath, served=served, params=params, route=text_route)
    if cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"], allow_headers=["*"]
        )
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    return app


def _service(
    name: str, index: "SearchIndex", encoder: "QueryEncoder", limits: Limits, metrics: Metrics
) -> IndexService:
    if not INDEX_NAME.match(name):
        raise LipkitError(f"index name {name!r} must be letters, digits, '.', '_' or '-' (at most 64)")
    index.check_model(encoder.record)
    return IndexService(name, index, encoder, limits, lambda kind, size: metrics.observe_batch(name, kind, size))


def _add_error_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return JSONResponse(exc.body(), status_code=exc.status)

    async def on_invalid(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}" for e in exc.errors()[:5]]
        return JSONResponse({"error": "invalid_request", "detail": "; ".join(parts)}, status_code=422)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {400: "invalid_body", 404: "not_found"}.get(exc.status_code, "http_error")  # 400: unreadable body
        return JSONResponse(
            {"error": code, "detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers
        )

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_invalid)
    app.add_exception_handler(StarletteHTTPException, on_http)


def hit_json(index: str, hit: "Hit") -> dict[str, Any]:
    """A search result as the API returns it (metadata without thumbnail bytes, a thumbnail URL)."""
    return item_json(index, hit.key, hit.metadata) | {"score": float(hit.score)}


def item_json(index: str, key: str, metadata: dict[str, Any]) -> dict[str, Any]:
    """An item's metadata as the API returns it."""
    extra = {name: value for name, value in metadata.items() if name not in ("thumbnail", "caption", "source")}
    return {
        "key": key,
        "caption": metadata.get("caption"),
        "source": metadata.get("source"),
        "thumbnail": thumbnail_url(index, key),
        "metadata": extra,
    }


async def page(service: IndexService, vector: Any, options: SearchOptions) -> dict[str, Any]:
    """Search one page; one result more than the page is asked for, to know whether another page follows.

    The routes return the page as a ready response: it has the shape of :class:`schemas.SearchResults` (the spec
    says so), and skipping FastAPI's re-validation of every hit saves a good part of a query's time.
    """
    probe = SearchOptions(options.k + 1, options.offset, options.where, options.collapse)
    hits = await service.search(vector, probe)
    more = len(hits) > options.k and options.offset + options.k <= service.limits.max_offset
    return {
        "index": service.name,
        "k": options.k,
        "offset": options.offset,
        "next_offset": options.offset + options.k if more else None,
        "results": [hit_json(service.name, hit) for hit in hits[: options.k]],
    }


async def text_search(served: Served, params: SearchParams, index: str, query: Mapping[str, str]) -> dict[str, Any]:
    """One page of a text search of ``index``, its parameters read from ``query``.

    Raises:
        ApiError: 404 for an index that is not served, 422 for a bad parameter, 400 for a bad filter.
    """
    service = served.service(index)
    text, options = params.query_text(query), params.search_options(query)
    return await page(service, await service.text_vector(text), options)


class TextSearchFastPath:
    """Pure ASGI middleware that answers ``GET /api/indexes/{index}/search`` itself.

    Text search is the server's hot route, and under load each request's Python work on the event loop is
    time the encoder waits (clients that wait for their answers ask again only once it is sent). FastAPI's
    routing, request object, dependency solving and exception layers took about a quarter of that route's
    own time on the event loop (``benchmarks/search_route.py``: 233 against 169 us per request with the same
    handler; ``benchmarks/search_server.py`` measures the server end to end). This layer sits inside the
    metrics, body-limit and CORS middleware, so those still apply. The FastAPI route of the same path stays
    declared, with the same handler (:func:`text_search`), for the OpenAPI spec; this layer labels requests
    with it (metrics), reads the query string as Starlette does (the last value of a repeated name), and
    answers refusals with the same 4xx bodies.
    """

    PREFIX, SUFFIX = "/api/indexes/", "/search"

    def __init__(self, app: Any, served: Served, params: SearchParams, route: Any) -> None:
        self.app, self.served, self.params, self.route = app, served, params, route

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        index = self._index(scope)
        if index is None:
            await self.app(scope, receive, send)
            return
        scope["route"] = self.route
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True))
        try:
            response = JSONResponse(await text_search(self.served, self.params, index, query))
        except ApiError as exc:
            response = JSONResponse(exc.body(), status_code=exc.status)
        await response(scope, receive, send)

    def _index(self, scope: dict[str, Any]) -> str | None:
        """The index name of a text-search request, None for any other request."""
        if scope["type"] != "http" or scope.get("method") != "GET":
            return None
        path, root = scope["path"], scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        if not (path.startswith(self.PREFIX) and path.endswith(self.SUFFIX)):
            return None
        index = path[len(self.PREFIX) : -len(self.SUFFIX)]
        return index if index and "/" not in index else None


SEARCH_ERRORS = error_responses(400, 404, 422)


def _add_search_routes(app: FastAPI, served: Served, params: SearchParams) -> None:
    limits = served.limits
    Key = Annotated[str, Query(min_length=1, max_length=limits.max_key_chars, description="an indexed item's key")]
    models = schemas.request_models(limits)
    QueryBody = models.query

    @app.get(
        "/api/indexes/{index}/search",
        response_model=schemas.SearchResults,
        responses=SEARCH_ERRORS,
        tags=["search"],
        openapi_extra=params.openapi(with_text=True),
    )
    async def search_text(index: str, request: Request) -> JSONResponse:
        """Search by text (``q``)."""
        return JSONResponse(await text_search(served, params, index, request.query_params))

    @app.post(
        "/api/indexes/{index}/search/image",
        response_model=schemas.SearchResults,
        responses=error_responses(400, 404, 413, 415, 422),
        tags=["search"],
        openapi_extra=params.openapi(),
    )
    async def search_image(index: str, request: Request, file: Annotated[UploadFile, File()]) -> JSONResponse:
        """Search by an uploaded image (multipart field ``file``)."""
        service = served.service(index)
        options = params.search_options(request.query_params)
        image = decode_image(await file.read(limits.max_upload_bytes + 1), limits)
        return JSONResponse(await page(service, await service.image_vector(image), options))

    @app.get(
        "/api/indexes/{index}/similar",
        response_model=schemas.SearchResults,
        responses=SEARCH_ERRORS,
        tags=["search"],
        openapi_extra=params.openapi(),
    )
    async def similar(index: str, key: Key, request: Request) -> JSONResponse:
        """More like an indexed item (the item itself comes first)."""
        service = served.service(index)
        options = params.search_options(request.query_params)
        return JSONResponse(await page(service, await service.key_vector(key), options))

    @app.post(
        "/api/indexes/{index}/query",
        response_model=schemas.SearchResults,
        responses=error_responses(400, 404, 413, 415, 422),
        tags=["search"],
    )
    async def query(index: str, body: QueryBody) -> JSONResponse:  # type: ignore[valid-type]
        """Search by weighted terms: texts, indexed keys, base64 images and vectors; negative weights push away."""
        service = served.service(index)
        terms = [_term(term, limits) for term in body.terms]
        options = SearchOptions(body.k, body.offset, body.where or None, body.collapse)
        return JSONResponse(await page(service, await service.combined_vector(terms), options))


def _term(term: Any, limits: Limits) -> Term:
    image_b64 = getattr(term, "image_b64", None)
    image = decode_base64_image(image_b64, limits) if image_b64 is not None else None
    return Term(
        term.weight, getattr(term, "text", None), getattr(term, "key", None), image, getattr(term, "vector", None)
    )


def _token_check(served: Served) -> Any:
    bearer = HTTPBearer(auto_error=False, description="the token given to `lipkit serve`")

    async def require_token(credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
        if credentials is None:
            raise ApiError(401, "no_token", "this route needs an 'Authorization: Bearer TOKEN' header")
        if served.token is None:
            raise ApiError(403, "writes_disabled", "writes are off: start the server with a token to allow them")
        if not hmac.compare_digest(credentials.credentials.encode(), served.token.encode()):
            raise ApiError(403, "wrong_token", "the bearer token is wrong")

    return require_token


def _add_item_routes(app: FastAPI, served: Served) -> None:
    limits = served.limits
    Key = Annotated[str, Query(min_length=1, max_length=limits.max_key_chars, description="an indexed item's key")]
    models = schemas.request_models(limits)
    AddBody, DeleteBody = models.add, models.delete
    writer = [Depends(_token_check(served))]

    @app.get(
        "/api/indexes/{index}/item", response_model=schemas.Item, responses=error_responses(404, 422), tags=["items"]
    )
    async def item(index: str, key: Key) -> dict[str, Any]:
        """An indexed item's metadata."""
        return item_json(index, key, await served.service(index).item(key))

    @app.get(
        "/api/indexes/{index}/thumbnail",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}, "description": "a JPEG"}, **error_responses(404, 422)},
        tags=["items"],
    )
    async def thumbnail(index: str, key: Key) -> Response:
        """An indexed item's thumbnail (JPEG). Keys are looked up in the index, never used as file paths."""
        data = await served.service(index).thumbnail(key)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=300"})

    @app.post(
        "/api/indexes/{index}/items",
        response_model=schemas.Changed,
        dependencies=writer,
        responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422),
        tags=["items"],
    )
    async def add(index: str, body: AddBody) -> dict[str, Any]:  # type: ignore[valid-type]
        """Add items, or replace those with the same key (needs the bearer token)."""
        service = served.service(index)
        items = [_new_item(item, limits) for item in body.items]
        added = await service.add(items)
        return {"index": index, "added": added, "size": len(service.index)}

    @app.post(
        "/api/indexes/{index}/items/delete",
        response_model=schemas.Changed,
        dependencies=writer,
        responses=error_responses(400, 401, 403, 404, 409, 422),
        tags=["items"],
    )
    async def delete(index: str, body: DeleteBody) -> dict[str, Any]:  # type: ignore[valid-type]
        """Delete items by key; unknown keys are skipped and not counted (needs the bearer token)."""
        service = served.service(index)
        deleted = await service.delete(body.keys)
        return {"index": index, "deleted": deleted, "size": len(service.index)}


RESERVED_COLUMNS = ("key", "thumbnail", "caption", "source")


def _new_item(item: Any, limits: Limits) -> NewItem:
    reserved = sorted(set(item.metadata) & set(RESERVED_COLUMNS))
    if reserved:
        raise ApiError(422, "reserved_column", f"metadata may not set {', '.join(reserved)}: use the item's own fields")
    metadata: dict[str, Any] = dict(item.metadata)
    for name in ("caption", "source"):
        if getattr(item, name) is not None:
            metadata[name] = getattr(item, name)
    image_b64 = getattr(item, "image_b64", None)
    image = decode_base64_image(image_b64, limits) if image_b64 is not None else None
    if image is not None:
        metadata["thumbnail"] = thumbnail_jpeg(image)
    return NewItem(item.key, metadata, getattr(item, "vector", None), image, getattr(item, "text", None))


def _add_system_routes(app: FastAPI, served: Served) -> None:
    @app.get("/api/indexes", response_model=schemas.IndexList, tags=["system"])
    async def indexes() -> dict[str, Any]:
        """The served indexes; the first is the default."""
        return {"indexes": [service.summary() for service in served.services.values()]}

    @app.get("/healthz", response_model=schemas.Health, tags=["system"])
    async def healthz() -> dict[str, Any]:
        """Liveness: the size of every served index."""
        return {"status": "ok", "indexes": {name: len(s.index) for name, s in served.services.items()}}

    @app.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}}, tags=["system"])
    async def metrics() -> Response:
        """Prometheus metrics: requests, latency, batch sizes."""
        return Response(served.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    async def home() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

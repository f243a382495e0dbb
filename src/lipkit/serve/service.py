"""One served index with its encoder: every query kind as an async method over :mod:`lipkit.index`.

The route handlers call these methods and nothing below them: the FAISS index and the SQLite metadata
stay behind :class:`lipkit.index.store.SearchIndex`. Text queries from concurrent requests are encoded
in batches, and the query vectors of concurrent searches are searched in batches (:mod:`.batching`): the
two steps run on their own threads, so one batch is searched while the next is encoded (one call doing
both answered fewer queries over HTTP: docs/benchmarks.md, the search server).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np

from lipkit.errors import LipkitError
from lipkit.serve.batching import DynamicBatcher
from lipkit.serve.limits import ApiError, Limits, not_found
from lipkit.serve.metrics import Metrics

if TYPE_CHECKING:
    from PIL import Image

    from lipkit.index.encoder import QueryEncoder
    from lipkit.index.store import Hit, SearchIndex


@dataclass(frozen=True)
class SearchOptions:
    """How many results, from where, among which items.

    Attributes:
        k: Results per page.
        offset: Results to skip (the page start).
        where: A filter expression (``source = emoji``), applied inside the index search.
        collapse: Cosine similarity above which results count as near duplicates of a better one.
    """

    k: int = 10
    offset: int = 0
    where: str | None = None
    collapse: float | None = None


@dataclass
class Term:
    """One part of a combined query: exactly one of text, key, image or vector, with a weight."""

    weight: float = 1.0
    text: str | None = None
    key: str | None = None
    image: Image.Image | None = None
    vector: Sequence[float] | None = None


@dataclass
class NewItem:
    """An item to add: its key, metadata, and what to embed (a vector, an image, or a text)."""

    key: str
    metadata: dict[str, Any] = field(default_factory=dict)
    vector: Sequence[float] | None = None
    image: Image.Image | None = None
    text: str | None = None


class IndexService:
    """The queries, reads and writes of one index.

    Args:
        name: The index's name in URLs.
        index: The open index.
        encoder: The model that made its vectors.
        limits: Batch size and wait.
        on_batch: Called with (kind, size) for every batch (``text`` encodes, ``search`` lookups).
    """

    def __init__(
        self,
        name: str,
        index: SearchIndex,
        encoder: QueryEncoder,
        limits: Limits,
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.name = name
        self.index = index
        self.encoder = encoder
        self.dim = int(index.record.embed_dim)
        self.limits = limits
        self._model_thread = ThreadPoolExecutor(1, thread_name_prefix=f"encode-{name}")
        self._search_thread = ThreadPoolExecutor(1, thread_name_prefix=f"search-{name}")
        self._write_thread = ThreadPoolExecutor(1, thread_name_prefix=f"write-{name}")  # one writer at a time
        note = on_batch or (lambda kind, size: None)
        self._texts: DynamicBatcher[str, np.ndarray] = DynamicBatcher(
            self._encode_texts,
            max_batch=limits.batch_size,
            max_wait=limits.batch_wait,
            executor=self._model_thread,
            on_batch=lambda n: note("text", n),
            regroup=limits.batch_regroup,
        )
        self._searches: DynamicBatcher[tuple[np.ndarray, SearchOptions], list[Hit]] = DynamicBatcher(
            self._search_batch,
            max_batch=limits.batch_size,
            max_wait=limits.batch_wait,
            executor=self._search_thread,
            on_batch=lambda n: note("search", n),
        )

    # -- query vectors ------------------------------------------------------------------------------------

    def _encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        return list(self.encoder.encode_texts(texts))

    async def text_vector(self, text: str) -> np.ndarray:
        """The embedding of a text query (batched with concurrent ones)."""
        return await self._texts.submit(text)

    async def image_vector(self, image: Image.Image) -> np.ndarray:
        """The embedding of an image, on the model's thread."""
        loop = asyncio.get_running_loop()
        try:
            vectors = await loop.run_in_executor(self._model_thread, self.encoder.encode_images, [image])
        except LipkitError as exc:
            raise api_error(exc) from None
        return vectors[0]

    async def key_vector(self, key: str) -> np.ndarray:
        """The stored vector of an indexed item ("more like this").

        Raises:
            ApiError: 404 for a key that is not in the index.
        """
        found = await asyncio.to_thread(self._stored_vector, key)
        if found is None:
            raise not_found(f"no item with key {key!r} in index {self.name!r}")
        return found

    def _stored_vector(self, key: str) -> np.ndarray | None:
        if not self.index.contains(key):
            return None
        try:
            return np.asarray(self.index.vectors([key]), dtype=np.float32)[0]
        except LipkitError:  # deleted since the check
            return None

    def check_vector(self, values: Sequence[float]) -> np.ndarray:
        """A vector given by a client, as float32, checked for size and finiteness.

        Raises:
            ApiError: 422 for the wrong size, NaN or infinite values, or a zero vector.
        """
        vector = np.asarray(values, dtype=np.float32)
        if vector.ndim != 1 or vector.shape[0] != self.dim:
            raise ApiError(
                422, "wrong_dimension", f"the vector has {vector.size} values; index {self.name!r} has {self.dim}"
            )
        if not np.isfinite(vector).all():
            raise ApiError(422, "not_finite", "the vector holds NaN or infinite values")
        norm = float(np.linalg.norm(vector))
        if norm == 0.0:
            raise ApiError(422, "zero_vector", "the vector is all zeros")
        return vector / norm

    async def term_vector(self, term: Term) -> np.ndarray:
        """The vector of one term of a combined query."""
        if term.text is not None:
            return await self.text_vector(term.text)
        if term.key is not None:
            return await self.key_vector(term.key)
        if term.image is not None:
            return await self.image_vector(term.image)
        if term.vector is not None:
            return self.check_vector(term.vector)
        raise ApiError(422, "empty_term", "a term needs one of text, key, image_b64 or vector")

    async def combined_vector(self, terms: Sequence[Term]) -> np.ndarray:
        """The weighted sum of the terms' vectors, normalised (negative weights push away).

        Raises:
            ApiError: 400 when the terms cancel out.
        """
        from lipkit.index.query import combine

        vectors = await asyncio.gather(*(self.term_vector(term) for term in terms))
        try:
            return combine(list(vectors), [term.weight for term in terms])
        except LipkitError as exc:
            raise ApiError(400, "bad_query", str(exc)) from None

    # -- searches ----------------------------------------------------------------------------------------

    def _search_batch(self, requests: list[tuple[np.ndarray, SearchOptions]]) -> list[list[Hit] | Exception]:
        """Search every group of requests with the same options in one index call."""
        results: list[list[Hit] | Exception] = [[] for _ in requests]
        groups: dict[SearchOptions, list[int]] = {}
        for i, (_, options) in enumerate(requests):
            groups.setdefault(options, []).append(i)
        for options, members in groups.items():
            queries = np.stack([requests[i][0] for i in members]).astype(np.float32, copy=False)
            try:
                found: Sequence[list[Hit] | Exception] = self.index.search(
                    queries, options.k, where=options.where, offset=options.offset, collapse=options.collapse
                )
            except LipkitError as exc:
                found = [exc] * len(members)
            for i, hits in zip(members, found, strict=True):
                results[i] = hits
        return results

    async def search(self, vector: np.ndarray, options: SearchOptions) -> list[Hit]:
        """The nearest items to a query vector (batched with concurrent searches).

        Raises:
            ApiError: 400 for a filter the index cannot parse, 404 for an unknown key in it.
        """
        try:
            return await self._searches.submit((vector, options))
        except LipkitError as exc:
            raise api_error(exc) from None

    # -- items ----------------------------------------------------------------------------------------------

    async def item(self, key: str) -> dict[str, Any]:
        """The metadata of one item.

        Raises:
            ApiError: 404 for an unknown key.
        """
        (found,) = await asyncio.to_thread(self.index.get, [key])
        if found is None:
            raise not_found(f"no item with key {key!r} in index {self.name!r}")
        return found

    async def items(self, keys: Sequence[str]) -> list[dict[str, Any] | None]:
        """The metadata of several items (None for unknown keys)."""
        return await asyncio.to_thread(self.index.get, list(keys))

    async def keys_for_ids(self, ids: Sequence[int]) -> list[str | None]:
        """The keys of the items' stable integer ids (None for ids the index does not hold)."""
        return await asyncio.to_thread(self.index.keys_for_ids, list(ids))

    async def thumbnail(self, key: str) -> bytes:
        """The JPEG thumbnail of an indexed item; keys are looked up in the index, never used as paths.

        Raises:
            ApiError: 404 for an unknown key or an item without a thumbnail.
        """
        try:
            data = await asyncio.to_thread(self.index.thumbnail, key)
        except LipkitError:  # an unknown key
            data = None
        if data is None:
            raise not_found(f"no thumbnail for key {key!r} in index {self.name!r}")
        return data

    async def add(self, items: Sequence[NewItem]) -> int:
        """Embed and add (or replace) items; returns how many were written."""
        vectors = [await self._item_vector(item) for item in items]
        keys = [item.key for item in items]
        metadata = [item.metadata for item in items]
        try:
            return await self._write(self.index.add, keys, np.stack(vectors), metadata)
        except LipkitError as exc:
            raise api_error(exc) from None

    async def _item_vector(self, item: NewItem) -> np.ndarray:
        if item.vector is not None:
            return self.check_vector(item.vector)
        if item.image is not None:
            if self.index.modality != "image":
                raise ApiError(422, "wrong_modality", f"index {self.name!r} holds {self.index.modality} vectors")
            return await self.image_vector(item.image)
        if item.text is not None:
            if self.index.modality != "text":
                raise ApiError(422, "wrong_modality", f"index {self.name!r} holds {self.index.modality} vectors")
            return await self.text_vector(item.text)
        raise ApiError(422, "empty_item", f"item {item.key!r} needs one of vector, image_b64 or text")

    async def delete(self, keys: Sequence[str]) -> int:
        """Delete items by key; returns how many were there."""
        try:
            return await self._write(self.index.delete, list(keys))
        except LipkitError as exc:
            raise api_error(exc) from None

    async def _write(self, change: Callable[..., int], *args: Any) -> int:
        """Run an add or a delete on the writer thread (writes are serialised; searches go on meanwhile)."""
        return await asyncio.get_running_loop().run_in_executor(self._write_thread, change, *args)

    def summary(self) -> dict[str, Any]:
        """The index's name, size, type and model, for listings."""
        record = self.index.record
        config = record.config if isinstance(record.config, str) else "custom"
        return {
            "name": self.name,
            "size": len(self.index),
            "modality": self.index.modality,
            "index_type": self.index.index_type,
            "embed_dim": self.dim,
            "model": config,
            "fingerprint": record.fingerprint,
        }

    async def aclose(self) -> None:
        """Stop the batchers and the threads."""
        await self._texts.aclose()
        await self._searches.aclose()
        self._model_thread.shutdown(wait=False, cancel_futures=True)
        self._search_thread.shutdown(wait=False, cancel_futures=True)
        self._write_thread.shutdown(wait=True)  # a write in progress finishes


def api_error(exc: LipkitError) -> ApiError:
    """The HTTP answer to a library error met while answering a request: 404 for an unknown key, 415 for an
    image the model cannot take, 409 when another process writes to the index, 503 when the disk refuses a
    write, and 400 for the rest (a bad filter, a query that cancels out)."""
    from lipkit.errors import FolderInUseError, StorageError
    from lipkit.index.encoder import ImageInputError
    from lipkit.index.errors import FilterError, UnknownKeyError

    statuses: list[tuple[type[LipkitError], int, str]] = [
        (UnknownKeyError, 404, "unknown_key"),
        (FilterError, 400, "bad_filter"),
        (ImageInputError, 415, "not_an_image"),
        (FolderInUseError, 409, "index_busy"),  # another process writes to the index
        (StorageError, 503, "storage"),  # the disk refused a write: not the client's fault
    ]
    for cls, status, code in statuses:
        if isinstance(exc, cls):
            return ApiError(status, code, str(exc))
    return ApiError(400, "bad_request", str(exc))


class Served:
    """What the routes share: the services by name, the limits, the token and the metrics."""

    def __init__(self, services: dict[str, IndexService], limits: Limits, token: str | None, metrics: Metrics) -> None:
        self.services = services
        self.limits = limits
        self.token = token
        self.metrics = metrics

    def service(self, name: str) -> IndexService:
        """The service of index ``name``.

        Raises:
            ApiError: 404 for an index that is not served.
        """
        found = self.services.get(name)
        if found is None:
            raise not_found(f"no index named {name!r}; served: {', '.join(self.services)}")
        return found


# percent-encoding of every ASCII character that is not unreserved, for str.translate (a search answers ten
# or more thumbnail URLs; urllib's quote costs several microseconds each)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.-~")
_QUOTE_ASCII = {c: f"%{c:02X}" for c in range(128) if chr(c) not in _UNRESERVED}


def quote_part(text: str) -> str:
    """``text`` percent-encoded as one URL component (``urllib.parse.quote(text, safe='')``)."""
    return text.translate(_QUOTE_ASCII) if text.isascii() else quote(text, safe="")


def thumbnail_url(index: str, key: str) -> str:
    """The URL path of an item's thumbnail."""
    return f"/api/indexes/{quote_part(index)}/thumbnail?key={quote_part(key)}"

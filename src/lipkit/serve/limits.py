"""The server's limits and its HTTP errors: every refusal is a 4xx with a one-line JSON body."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel


@dataclass(frozen=True)
class Limits:
    """What one request may ask of the server.

    Attributes:
        max_upload_bytes: Largest image upload (multipart file, or decoded base64 in a JSON body).
        max_text_chars: Longest text query.
        max_k: Most results per page (the index gives at most 1,000, and a page asks for one more).
        max_offset: Deepest page start (the index searches at most 10,000 deep).
        max_terms: Most terms in one combined query.
        max_items: Most items in one add or delete request.
        max_key_chars: Longest item key.
        max_pixels: Largest decoded image (width times height), against decompression bombs.
        batch_size: Most queries the encoder and the index take in one batch.
        batch_wait: Seconds a batch waits for more queries after its first. Zero by default: a batch is
            what queued while the previous one ran, so an idle server answers at once and a busy one
            batches by itself; a wait only pays where a batch costs the same whatever its size
            (docs/benchmarks.md, the search server).
        batch_regroup: Where a text batch holds fewer queries than the previous round, it waits at most this
            fraction of the last batch's encoding time for the rest (:class:`DynamicBatcher`'s ``regroup``).
    """

    max_upload_bytes: int = 10 * 1024 * 1024
    max_text_chars: int = 1000
    max_k: int = 500
    max_offset: int = 9000
    max_terms: int = 16
    max_items: int = 1000
    max_key_chars: int = 512
    max_pixels: int = 64_000_000
    batch_size: int = 64
    batch_wait: float = 0.0
    batch_regroup: float = 0.5

    @property
    def max_body_bytes(self) -> int:
        """Largest request body: an upload as base64 (4/3 of its size) plus room for the other fields."""
        return self.max_upload_bytes * 4 // 3 + 64 * 1024


class ErrorBody(BaseModel):
    """The body of every 4xx answer."""

    error: str
    detail: str


class ApiError(Exception):
    """A request the server refuses: its status, a short code and one clear line.

    Args:
        status: The HTTP status (4xx).
        code: A stable machine-readable word (``unknown_key``, ``too_large``...).
        detail: The one line a person reads.
    """

    def __init__(self, status: int, code: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail

    def body(self) -> dict[str, str]:
        """The JSON body of the answer."""
        return {"error": self.code, "detail": self.detail}


def not_found(what: str) -> ApiError:
    """A 404 naming what is missing."""
    return ApiError(404, "not_found", what)


# The statuses each kind of route may answer, declared in the OpenAPI spec.
ERROR_STATUSES = {
    400: "bad request (a filter that cannot be parsed, a query that sums to zero)",
    401: "no bearer token",
    403: "wrong bearer token, or writes are disabled",
    404: "unknown index or key",
    409: "another process is writing to the index",
    413: "upload or body too large",
    415: "not an image",
    422: "invalid request fields",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, object]]:
    """The ``responses`` argument of a route: the listed statuses with :class:`ErrorBody`."""
    return {status: {"model": ErrorBody, "description": ERROR_STATUSES[status]} for status in statuses}

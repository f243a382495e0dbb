"""The query-string parameters of the search routes, read without FastAPI's per-field validation.

A text search is the server's hottest route. FastAPI validates every declared query parameter through
pydantic; reading the five parameters of a search here instead saves about 30 us of the route's 270 us of
event-loop CPU per request (``benchmarks/search_route.py``: 1.14x, docs/benchmarks.md). One table gives both the
parsing and the OpenAPI spec's parameter entries (each route passes :meth:`SearchParams.openapi` as
``openapi_extra``). Bad values answer 422 ``invalid_request`` with a line naming the parameter, as FastAPI's
own validation errors do on the other routes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lipkit.serve.limits import ApiError, Limits
from lipkit.serve.service import SearchOptions


@dataclass(frozen=True)
class Param:
    """One query parameter: its name, type, bounds and help.

    Attributes:
        name: The parameter's name in the query string.
        kind: ``integer``, ``number`` or ``string`` (the OpenAPI type).
        description: One line for the spec.
        low: The least value (integers and numbers) or length (strings).
        high: The greatest value or length.
        low_open: ``low`` itself is not allowed.
        required: The route answers 422 without it.
        default: Its value when absent.
    """

    name: str
    kind: str
    description: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    required: bool = False
    default: Any = None

    def parse(self, raw: str | None) -> Any:
        """The parameter's value from its raw text (None when absent).

        Raises:
            ApiError: 422 for a missing required value, a value of the wrong type or one out of bounds.
        """
        if raw is None:
            if self.required:
                raise self._error("field required")
            return self.default
        if self.kind == "string":
            if (self.low is not None and len(raw) < self.low) or (self.high is not None and len(raw) > self.high):
                raise self._error(f"must be {self._bounds('characters')}")
            return raw
        value = _number(raw, integer=self.kind == "integer")
        if value is None:
            raise self._error(f"must be {'an integer' if self.kind == 'integer' else 'a number'}, not {raw[:40]!r}")
        below = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        if below or (self.high is not None and value > self.high) or not math.isfinite(value):
            raise self._error(f"must be {self._bounds('')}")
        return value

    def _bounds(self, unit: str) -> str:
        low = "" if self.low is None else f"{'over' if self.low_open else 'at least'} {self.low:g}"
        high = "" if self.high is None else f"at most {self.high:g}"
        return " and ".join(part for part in (low, high) if part) + (f" {unit}" if unit else "")

    def _error(self, message: str) -> ApiError:
        return ApiError(422, "invalid_request", f"query.{self.name}: {message}")

    def spec(self) -> dict[str, Any]:
        """The OpenAPI parameter object."""
        schema: dict[str, Any] = {"type": self.kind}
        if self.kind == "string":
            schema |= _drop_none({"minLength": self.low, "maxLength": self.high})
        else:
            lowest = "exclusiveMinimum" if self.low_open else "minimum"
            schema |= _drop_none({lowest: self.low, "maximum": self.high, "default": self.default})
        return {
            "name": self.name,
            "in": "query",
            "required": self.required,
            "description": self.description,
            "schema": schema,
        }


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {name: value for name, value in values.items() if value is not None}


def _number(raw: str, integer: bool) -> float | int | None:
    text = raw.strip()
    try:
        if integer:
            return int(text) if text.lstrip("+-").isdigit() and text.isascii() else None
        return float(text) if text and "_" not in text else None
    except ValueError:
        return None


class SearchParams:
    """The search routes' query parameters under the server's limits.

    Args:
        limits: The server's limits (the greatest ``k``, ``offset`` and text length).
    """

    def __init__(self, limits: Limits) -> None:
        self.text = Param("q", "string", "the text query", low=1, high=limits.max_text_chars, required=True)
        self.options = (
            Param("k", "integer", "results per page", low=1, high=limits.max_k, default=10),
            Param("offset", "integer", "results to skip", low=0, high=limits.max_offset, default=0),
            Param("where", "string", "filter, e.g. `source = emoji`", high=limits.max_text_chars),
            Param("collapse", "number", "collapse results more similar than this", low=0, high=1, low_open=True),
        )

    def search_options(self, query: Mapping[str, str]) -> SearchOptions:
        """The page, filter and collapsing a query string asks for.

        Raises:
            ApiError: 422 for a bad value.
        """
        k, offset, where, collapse = (param.parse(query.get(param.name)) for param in self.options)
        return SearchOptions(int(k), int(offset), where or None, None if collapse is None else float(collapse))

    def query_text(self, query: Mapping[str, str]) -> str:
        """The text of a text search (``q``).

        Raises:
            ApiError: 422 when it is missing, empty or too long.
        """
        return str(self.text.parse(query.get(self.text.name)))

    def openapi(self, with_text: bool = False) -> dict[str, Any]:
        """The ``openapi_extra`` of a route that reads these parameters."""
        params = ((self.text,) if with_text else ()) + self.options
        return {"parameters": [param.spec() for param in params]}

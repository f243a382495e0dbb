"""Request and response bodies of the search API.

Request models are strict (a string where a number belongs is refused, unknown fields are refused) and
built per app by :func:`request_models`, so that the bounds in the OpenAPI spec are the server's limits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from lipkit.serve.limits import Limits

Scalar = str | int | float | bool | None


class Hit(BaseModel):
    """One search result."""

    key: str
    score: float
    caption: str | None = None
    source: str | None = None
    thumbnail: str | None = Field(None, description="URL of the item's thumbnail")
    metadata: dict[str, Any] = Field(default_factory=dict)


class SearchResults(BaseModel):
    """A page of results."""

    index: str
    k: int
    offset: int
    next_offset: int | None = Field(None, description="the offset of the next page, or null after the last")
    results: list[Hit]


class IndexSummary(BaseModel):
    """A served index."""

    name: str
    size: int
    modality: str
    index_type: str
    embed_dim: int
    model: str
    fingerprint: str


class IndexList(BaseModel):
    """The served indexes, the first being the default."""

    indexes: list[IndexSummary]


class Item(BaseModel):
    """An indexed item's metadata."""

    key: str
    caption: str | None = None
    source: str | None = None
    thumbnail: str | None = None
    metadata: dict[str, Any]


class Changed(BaseModel):
    """The answer to an add or a delete."""

    index: str
    added: int = 0
    deleted: int = 0
    size: int


class Health(BaseModel):
    """The answer of ``/healthz``."""

    status: str
    indexes: dict[str, int]


@dataclass(frozen=True)
class RequestModels:
    """The request bodies of one app, bounded by its limits."""

    query: type[BaseModel]
    add: type[BaseModel]
    delete: type[BaseModel]


def request_models(limits: Limits) -> RequestModels:
    """Build the strict request models whose bounds are ``limits``."""
    strict = ConfigDict(strict=True, extra="forbid")
    Text = Annotated[str, Field(min_length=1, max_length=limits.max_text_chars)]
    Key = Annotated[str, Field(min_length=1, max_length=limits.max_key_chars)]
    Image64 = Annotated[str, Field(min_length=1, max_length=limits.max_body_bytes, description="an image, base64")]
    Vector = Annotated[list[float], Field(min_length=1, max_length=65536)]
    Where = Annotated[str, Field(max_length=limits.max_text_chars, description="filter, e.g. `source = emoji`")]

    class TermBase(BaseModel):
        model_config = strict
        weight: float = Field(1.0, ge=-100, le=100, description="negative weights push results away")

    class TextTerm(TermBase):
        """A text, embedded by the model."""

        text: Text

    class KeyTerm(TermBase):
        """An indexed item, by key."""

        key: Key

    class ImageTerm(TermBase):
        """An image, base64."""

        image_b64: Image64

    class VectorTerm(TermBase):
        """An embedding of the index's model."""

        vector: Vector

    QueryTerm = TextTerm | KeyTerm | ImageTerm | VectorTerm

    class Query(BaseModel):
        """A weighted combination of terms, searched with a filter, a page and near-duplicate collapsing."""

        model_config = strict
        terms: list[QueryTerm] = Field(min_length=1, max_length=limits.max_terms)  # type: ignore[valid-type]
        k: int = Field(10, ge=1, le=limits.max_k)
        offset: int = Field(0, ge=0, le=limits.max_offset)
        where: Where | None = None
        collapse: float | None = Field(None, gt=0, le=1, description="collapse results more similar than this")

    class ItemBase(BaseModel):
        model_config = strict
        key: Key
        caption: Annotated[str, Field(max_length=10_000)] | None = None
        source: Annotated[str, Field(max_length=200)] | None = None
        metadata: dict[Annotated[str, Field(min_length=1, max_length=64)], Scalar] = Field(
            default_factory=dict, max_length=64
        )

    class VectorItem(ItemBase):
        """An item given by its embedding."""

        vector: Vector

    class ImageItem(ItemBase):
        """An item given by its image (base64), embedded by the model; its thumbnail is made from it."""

        image_b64: Image64

    class TextItem(ItemBase):
        """An item given by a text, embedded by the model (for indexes of text embeddings)."""

        text: Text

    NewItem = VectorItem | ImageItem | TextItem

    class AddItems(BaseModel):
        """Items to add or replace (by key)."""

        model_config = strict
        items: list[NewItem] = Field(min_length=1, max_length=limits.max_items)  # type: ignore[valid-type]

    class DeleteItems(BaseModel):
        """Keys to delete."""

        model_config = strict
        keys: list[Key] = Field(min_length=1, max_length=limits.max_items)

    return RequestModels(Query, AddItems, DeleteItems)

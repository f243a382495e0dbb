"""Search: embed collections (:mod:`lipkit.index.embed`), keep indexes of them, and query those.

Importing the package is light: the names below load their module (and torch) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lipkit.data.embeddings import EmbeddingPart, Embeddings, ModelRecord, open_embeddings
    from lipkit.index.encoder import QueryEncoder, load_encoder, model_fingerprint

_HOMES = {
    "EmbeddingPart": "lipkit.data.embeddings",
    "Embeddings": "lipkit.data.embeddings",
    "open_embeddings": "lipkit.data.embeddings",
    "ModelRecord": "lipkit.data.embeddings",
    "QueryEncoder": "lipkit.index.encoder",
    "load_encoder": "lipkit.index.encoder",
    "model_fingerprint": "lipkit.index.encoder",
}

__all__ = [
    "EmbeddingPart",
    "Embeddings",
    "ModelRecord",
    "QueryEncoder",
    "load_encoder",
    "model_fingerprint",
    "open_embeddings",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562) and keep the name here."""
    if name not in _HOMES:
        raise AttributeError(f"module 'lipkit.index' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, with the public ones not loaded yet."""
    return sorted([*globals(), *_HOMES])

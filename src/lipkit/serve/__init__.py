"""The search server: a FastAPI app over :mod:`lipkit.index` (:func:`create_app`), its web page and
clip-retrieval's API, run by ``lipkit serve``.

Importing the package is light: the names below load their module (and FastAPI) on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lipkit.serve.app import create_app
    from lipkit.serve.limits import Limits

_HOMES = {"create_app": "lipkit.serve.app", "Limits": "lipkit.serve.limits"}

__all__ = ["Limits", "create_app"]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562)."""
    if name not in _HOMES:
        raise AttributeError(f"module 'lipkit.serve' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value

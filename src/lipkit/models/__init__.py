"""Model zoo: config-driven dual encoders, towers, tokenizers, transforms and checkpoint converters.

The names below load their module (and torch) on first use, so reading model configs
(``lipkit.models.config``) stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lipkit.models.clip import DualEncoder, DualEncoderOutput
    from lipkit.models.coca import CoCa, CoCaOutput
    from lipkit.models.config import ModelConfig, get_model_config, list_models
    from lipkit.models.factory import create_model, get_tokenizer, image_transform
    from lipkit.models.image_inputs import MixedImages
    from lipkit.models.text_inputs import TextCache, TextTokens

_HOMES = {
    "DualEncoder": "lipkit.models.clip",
    "DualEncoderOutput": "lipkit.models.clip",
    "CoCa": "lipkit.models.coca",
    "CoCaOutput": "lipkit.models.coca",
    "ModelConfig": "lipkit.models.config",
    "get_model_config": "lipkit.models.config",
    "list_models": "lipkit.models.config",
    "create_model": "lipkit.models.factory",
    "get_tokenizer": "lipkit.models.factory",
    "image_transform": "lipkit.models.factory",
    "MixedImages": "lipkit.models.image_inputs",
    "TextCache": "lipkit.models.text_inputs",
    "TextTokens": "lipkit.models.text_inputs",
}

__all__ = [
    "CoCa",
    "CoCaOutput",
    "DualEncoder",
    "DualEncoderOutput",
    "MixedImages",
    "ModelConfig",
    "TextCache",
    "TextTokens",
    "create_model",
    "get_model_config",
    "get_tokenizer",
    "image_transform",
    "list_models",
]


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562) and keep the name here."""
    if name not in _HOMES:
        raise AttributeError(f"module 'lipkit.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The module's names, with the public ones not loaded yet."""
    return sorted([*globals(), *_HOMES])

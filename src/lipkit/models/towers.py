"""Build image and text towers from their typed configs.

Tower types are registered in :mod:`lipkit.models.config` as their config classes (``VISION_TOWERS``,
``TEXT_TOWERS``); each config class names the tower it builds in its ``tower`` attribute.
"""

from __future__ import annotations

import importlib
from typing import Any

from torch import nn

from lipkit.models.config import TEXT_TOWERS, VISION_TOWERS

__all__ = ["TEXT_TOWERS", "VISION_TOWERS", "build_tower", "tower_class"]


def tower_class(cfg: Any) -> type[nn.Module]:
    """The tower class that a tower config (e.g. :class:`~lipkit.models.config.ViTConfig`) names."""
    module, _, name = type(cfg).tower.partition(":")
    return getattr(importlib.import_module(module), name)


def build_tower(cfg: Any, embed_dim: int) -> nn.Module:
    """The tower that ``cfg`` describes, with output width ``embed_dim``."""
    return tower_class(cfg)(cfg, embed_dim)

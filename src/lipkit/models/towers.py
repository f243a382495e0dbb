"""Registries of image and text towers, keyed by the ``type`` in a model config."""

from __future__ import annotations

from torch import nn

from lipkit.registry import Registry

VISION_TOWERS: Registry[type[nn.Module]] = Registry("image tower")
TEXT_TOWERS: Registry[type[nn.Module]] = Registry("text tower")


def _register() -> None:
    from lipkit.models.text import HFTextEncoder, TextTransformer
    from lipkit.models.timm_tower import TimmTower
    from lipkit.models.vit import VisionTransformer

    VISION_TOWERS.add("vit", VisionTransformer)
    VISION_TOWERS.add("timm", TimmTower)
    TEXT_TOWERS.add("transformer", TextTransformer)
    TEXT_TOWERS.add("hf", HFTextEncoder)


_register()

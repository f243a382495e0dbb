"""lipkit: language-image pre-training, from data to search.

The public API::

    import lipkit
    lipkit.list_models()
    model = lipkit.create_model("ViT-B-32", pretrained="open_clip_model.pt")
    model = lipkit.create_model("ViT-B-32", pretrained="openai")   # an OpenCLIP tag, from a file already here
    lipkit.list_pretrained("ViT-B-32")                              # its (name, tag) pairs
    tokenizer = lipkit.get_tokenizer("ViT-B-32")
    preprocess = lipkit.image_transform("ViT-B-32")
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "create_model", "get_tokenizer", "image_transform", "list_models", "list_pretrained"]


def __getattr__(name: str) -> Any:
    # Import torch-heavy modules on first use, so `lipkit --version` and `--help` stay instant.
    if name in ("create_model", "get_tokenizer", "image_transform", "list_models"):
        from lipkit import models

        return getattr(models, name)
    if name == "list_pretrained":
        from lipkit.models.pretrained import list_pretrained

        return list_pretrained
    raise AttributeError(f"module 'lipkit' has no attribute {name!r}")

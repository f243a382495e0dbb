"""OpenCLIP's pretrained tags: a ``(model name, tag)`` pair resolved to a weights file on this machine.

OpenCLIP names its released weights by model and tag (``ViT-B-32`` / ``openai``, ``ViT-B-16-SigLIP`` /
``webli``...). lipkit ships OpenCLIP's table of them (``openclip_pretrained.json``, written by
``tools/openclip_configs.py``): where each file lives on the Hugging Face hub, and the preprocessing
the weights were trained with. Nothing is downloaded. A pair is resolved to a file that is already here:

1. ``$LIPKIT_PRETRAINED_DIR/NAME/TAG/FILE`` (default ``~/.cache/lipkit/pretrained/NAME/TAG/FILE``);
2. the Hugging Face cache, as ``huggingface_hub`` (or OpenCLIP itself) left it:
   ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``,
   ``models--ORG--REPO/snapshots/*/FILE``.

When neither has it, the error names the URL to fetch and the path to save it at.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from lipkit.errors import LipkitError, suggest
from lipkit.utils import cache_root

HUB_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # OpenCLIP's names, preferred first


@cache
def _table() -> dict[str, dict[str, dict[str, Any]]]:
    return json.loads(resources.files("lipkit.models").joinpath("openclip_pretrained.json").read_text())


def list_pretrained(name: str | None = None) -> list[tuple[str, str]]:
    """OpenCLIP's ``(model name, tag)`` pairs, of one model or of all."""
    return [(n, tag) for n, tags in _table().items() if name in (None, n) for tag in tags]


def pretrained_info(name: str, tag: str) -> dict[str, Any]:
    """What OpenCLIP records for a pair: ``hf_hub``, ``url``, ``mean``, ``std``, ``interpolation``,
    ``resize_mode``, ``quick_gelu`` (only the fields it sets).

    Raises:
        LipkitError: The model has no such tag (the message lists its tags).
    """
    tags = _table().get(name)
    if not tags:
        raise LipkitError(f"OpenCLIP has no pretrained weights for {name!r}{suggest(name, list(_table()))}")
    if tag not in tags:
        raise LipkitError(f"{name} has no pretrained tag {tag!r}; its tags: {', '.join(sorted(tags))}")
    return tags[tag]


def local_folder() -> Path:
    """Where pretrained weights are looked for first: ``$LIPKIT_PRETRAINED_DIR``, else the cache's ``pretrained``."""
    return Path(os.environ.get("LIPKIT_PRETRAINED_DIR") or cache_root() / "pretrained")


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, as ``huggingface_hub`` finds it."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME")
    return Path(home) / "hub" if home else Path.home() / ".cache" / "huggingface" / "hub"


def hub_location(info: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The hub repository of a pair and the file names to look for in it (a named file, or OpenCLIP's two)."""
    parts = info["hf_hub"].strip("/").split("/")
    repo, named = "/".join(parts[:2]), "/".join(parts[2:])
    return repo, (named,) if named else HUB_FILES


def resolve_pretrained(name: str, tag: str) -> Path:
    """The weights file of OpenCLIP's pair ``(name, tag)`` on this machine.

    Raises:
        LipkitError: An unknown pair, or a file that is not here (the message says what to fetch and
            where to save it).
    """
    info = pretrained_info(name, tag)
    local = local_folder() / name / tag
    if "hf_hub" not in info:  # a file published only by URL
        file = info["url"].rsplit("/", 1)[-1]
        if (local / file).is_file():
            return local / file
        raise LipkitError(_missing(name, tag, info["url"], local / file))
    repo, files = hub_location(info)
    for file in files:
        if (local / file).is_file():
            return local / file
    snapshots = hub_cache() / f"models--{repo.replace('/', '--')}" / "snapshots"
    for file in files:
        found = sorted(snapshots.glob(f"*/{file}"))
        if found:
            return found[-1]
    url = f"https://huggingface.co/{repo}/resolve/main/{files[-1]}"
    raise LipkitError(_missing(name, tag, url, local / files[-1]) + f" (also looked in {snapshots})")


def _missing(name: str, tag: str, url: str, path: Path) -> str:
    return (
        f"the {name} weights tagged {tag!r} are not on this machine (nothing is downloaded): fetch {url} and "
        f"save it as {path}, or pass the file's path as pretrained="
    )

"""A model's fingerprint: one digest of its config and weights, for caches and indexes tied to a model."""

from __future__ import annotations

import hashlib
import json
import weakref
from typing import TYPE_CHECKING, Any

from lipkit.config import to_dict
from lipkit.utils import update_digest

if TYPE_CHECKING:
    from lipkit.models.clip import DualEncoder

_FINGERPRINTS: weakref.WeakKeyDictionary[Any, tuple[tuple[str, tuple[int, ...]], str]] = weakref.WeakKeyDictionary()


def model_fingerprint(model: DualEncoder) -> str:
    """A SHA-256 hex digest of a model's config and every weight: equal digests, equal embeddings.

    Cached per model object; an in-place change of any weight (training, ``load_state_dict``) is seen
    through the tensors' version counters, and a change of the config by comparing it, and either hashes
    the model again.
    """
    config = json.dumps(to_dict(model.cfg), sort_keys=True)
    versions = _versions(model)
    cached = _FINGERPRINTS.get(model)
    if versions is not None and cached is not None and cached[0] == (config, versions):
        return cached[1]
    h = hashlib.sha256(config.encode())
    update_digest(h, model)
    digest = h.hexdigest()
    if versions is not None:
        _FINGERPRINTS[model] = ((config, versions), digest)
    return digest


def _versions(model: DualEncoder) -> tuple[int, ...] | None:
    """The version counters of the model's tensors (None when one has none: made under inference mode)."""
    try:
        return tuple(t._version for t in model.state_dict().values())
    except RuntimeError:
        return None

"""On-disk caches of tensors that check themselves: a damaged entry is detected and rebuilt, never used.

Every entry is written atomically with a SHA-256 of its contents. Reading recomputes the digest; a file
that cannot be read, was cut short, or whose bytes changed (disk errors, a copy interrupted, a hand edit)
is reported with a warning, removed and computed again. ``check`` lets callers reject an entry whose
shapes do not fit what they expect.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from lipkit.errors import StorageError
from lipkit.utils import atomic_write, digest_tensor

FORMAT = "lipkit-cache-1"


def payload_digest(payload: dict[str, Any]) -> str:
    """SHA-256 of a dict of tensors and JSON-able values (keys sorted; tensors by dtype, shape and bytes)."""
    h = hashlib.sha256()
    for key in sorted(payload):
        value = payload[key]
        if isinstance(value, torch.Tensor):
            digest_tensor(h, key, value)
        else:
            h.update(f"{key}={json.dumps(value, sort_keys=True)}".encode())
    return h.hexdigest()


def save_cached(path: Path, payload: dict[str, Any]) -> None:
    """Write ``payload`` (tensors and JSON-able values) to ``path`` atomically, with its digest."""
    entry = {"format": FORMAT, "sha256": payload_digest(payload), "payload": payload}
    atomic_write(Path(path), lambda f: torch.save(entry, f))


def load_cached(path: Path, check: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any] | None:
    """The payload saved at ``path``, or ``None`` when there is none or it is damaged (then it is removed)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, map_location="cpu", weights_only=True)
        ok = isinstance(entry, dict) and entry.get("format") == FORMAT
        ok = ok and payload_digest(entry["payload"]) == entry["sha256"]
        problem = "its checksum does not match" if not ok else None
        if ok and check is not None and not check(entry["payload"]):
            problem = "its contents do not have the expected shapes"
    except Exception as exc:  # a truncated or garbled file: torch.load's own error, whatever it is
        problem = f"it cannot be read ({type(exc).__name__}: {exc})"
    if problem:
        warnings.warn(f"cache entry {path} is damaged ({problem}); rebuilding it", stacklevel=3)
        path.unlink(missing_ok=True)
        return None
    return entry["payload"]


def cached(
    path: Path, compute: Callable[[], dict[str, Any]], check: Callable[[dict[str, Any]], bool] | None = None
) -> dict[str, Any]:
    """``compute()``'s result, read from ``path`` when a sound entry is there, else computed and saved.

    A cache that cannot be written (read-only folder, full disk) only costs a warning.
    """
    payload = load_cached(path, check)
    if payload is not None:
        return payload
    payload = compute()
    try_save_cached(path, payload)
    return payload


def try_save_cached(path: Path, payload: dict[str, Any]) -> None:
    """:func:`save_cached`, where a cache that cannot be written (read-only, full disk) costs a warning."""
    try:
        save_cached(path, payload)
    except (OSError, StorageError) as exc:
        warnings.warn(f"cannot write cache entry {path}: {exc}", stacklevel=3)

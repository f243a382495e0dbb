"""Small shared helpers: atomic file writes, seeding, device selection."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file atomically: ``write`` fills a temporary file in the same folder, which then
    replaces ``path`` in one rename, so a crash never leaves a half-written file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def update_digest(h: Any, module: torch.nn.Module, skip_prefix: str | None = None) -> None:
    """Feed every tensor of ``module``'s state (name, dtype, shape and bytes) into hash ``h``."""
    for name, tensor in sorted(module.state_dict().items()):
        if skip_prefix and name.startswith(skip_prefix):
            continue
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
        h.update(flat.view(torch.uint8).numpy().tobytes())


def cache_root() -> Path:
    """lipkit's cache folder: ``$LIPKIT_CACHE_DIR``, else ``~/.cache/lipkit``."""
    return Path(os.environ.get("LIPKIT_CACHE_DIR") or Path.home() / ".cache" / "lipkit")

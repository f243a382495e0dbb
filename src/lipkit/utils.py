"""Small shared helpers: atomic file writes, folder locks, seeding, device selection."""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from lipkit.errors import FolderInUseError


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
        digest_tensor(h, name, tensor)


def digest_tensor(h: Any, name: str, tensor: torch.Tensor) -> None:
    """Feed one named tensor (name, dtype, shape and bytes, whatever its memory layout) into hash ``h``."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())


def cache_root() -> Path:
    """lipkit's cache folder: ``$LIPKIT_CACHE_DIR``, else ``~/.cache/lipkit``."""
    return Path(os.environ.get("LIPKIT_CACHE_DIR") or Path.home() / ".cache" / "lipkit")


class FolderLock:
    """An exclusive lock on a folder for as long as one process works in it.

    The lock is ``flock`` on ``FOLDER/.lock``, so it goes away with its process, even one that was
    killed: a crashed run never leaves a stale lock behind. The file records what the holder does
    (``what``), its pid and start time, for the error message of the next process that tries.

    Raises:
        FolderInUseError: On :meth:`acquire` (or entering the context) while another process holds it.
    """

    def __init__(self, folder: Path, what: str = "a lipkit job") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / ".lock"
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl
        import time

        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise FolderInUseError(
                f"cannot start {self.what} in {self.folder}: another process is working there ({holder}); "
                "wait for it to finish, or use another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.what}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

"""Small shared helpers: atomic file writes, folder locks, seeding, device selection, the cache folder,
this process's rank, and files inside installed packages.

PyTorch is imported only inside the helpers that use it, so that the data modules stay light.
"""

from __future__ import annotations

import importlib.util
import os
import random
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from lipkit.errors import ConfigError, FolderInUseError, LipkitError

if TYPE_CHECKING:
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
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``."""
    import torch

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
    import torch

    flat = tensor.detach().cpu().contiguous().reshape(-1)
    h.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}".encode())
    h.update(flat.view(torch.uint8).numpy().tobytes())


def cache_root() -> Path:
    """lipkit's cache folder: ``$LIPKIT_CACHE_DIR``, else ``~/.cache/lipkit``."""
    return Path(os.environ.get("LIPKIT_CACHE_DIR") or Path.home() / ".cache" / "lipkit")


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes in the job.

    Those of the default process group once one is running; before that, torchrun's ``RANK`` and
    ``WORLD_SIZE`` (0 and 1 in a plain process).

    Raises:
        ConfigError: ``RANK`` or ``WORLD_SIZE`` is not an integer, or the rank is outside the world.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError:
        raise ConfigError("RANK and WORLD_SIZE must be integers") from None
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in [0, WORLD_SIZE={world})")
    return rank, world


def package_folders(package: str) -> list[Path]:
    """The folders of installed top-level package ``package``, found without importing it.

    Args:
        package: Import name of a top-level package (``mlxtend``, ``clip_benchmark``).

    Returns:
        Its folders (several only for a namespace package); empty when it is not installed.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(folder) for folder in spec.submodule_search_locations]


def find_in_package(package: str, relative: str = "") -> Path | None:
    """``relative`` inside installed package ``package`` (its folder when empty); None when either is missing."""
    for folder in package_folders(package):
        if (folder / relative).exists():
            return folder / relative
    return None


def package_path(package: str, relative: str = "", install: str | None = None) -> Path:
    """A file or folder inside an installed package, found without importing the package.

    Args:
        package: Import name of a top-level package.
        relative: Path inside the package; empty for the package's own folder.
        install: The command that installs the package, for the error message (default
            ``pip install PACKAGE``).

    Raises:
        LipkitError: The package is not installed, or holds nothing at ``relative``; the message names
            the package and the install command.
    """
    path = find_in_package(package, relative)
    if path is not None:
        return path
    install = install or f"pip install {package}"
    folders = package_folders(package)
    if not folders:
        raise LipkitError(f"package {package!r} is not installed; install it with `{install}`")
    missing = folders[0] / relative
    raise LipkitError(f"{missing} is missing from the installed {package!r}; reinstall it with `{install}`")


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

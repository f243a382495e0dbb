"""Small shared helpers: atomic file writes, folder locks, seeding, device selection, the cache folder,
this process's rank, and files inside installed packages.

PyTorch is imported only inside the helpers that use it, so that the data modules stay light.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import random
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import numpy as np

from lipkit.errors import ConfigError, FolderInUseError, LipkitError, find_os_error, storage_error

if TYPE_CHECKING:
    import torch


def atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write a file atomically: ``write`` fills a temporary file in the same folder, which then
    replaces ``path`` in one rename, so a crash never leaves a half-written file behind.

    On any failure the temporary file is removed and the previous ``path``, if any, is left as it was.

    Raises:
        StorageError: The file system refused the write (read-only, full, no permission, a missing folder),
            also when ``write`` met it through a library that wraps the error (``torch.save``).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise storage_error(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):  # a folder that turned read-only keeps it; the next write cleans up
            os.unlink(tmp)
        fault = _write_fault(exc, tmp)
        if fault is None:
            raise
        raise storage_error(fault, path) from None


def _write_fault(exc: BaseException, tmp: str) -> OSError | None:
    """The operating system's error behind ``exc`` when it came from writing ``tmp``, else None.

    An error that names another file (an input that ``write`` failed to read) is not a write fault.
    """
    if not isinstance(exc, Exception) or isinstance(exc, LipkitError):
        return None
    fault = find_os_error(exc)
    return fault if fault is not None and fault.errno is not None and fault.filename in (None, tmp) else None


def check_writable(path: Path) -> None:
    """Check, before any work, that ``path`` can be written: its folder exists (it is created) and takes a new file.

    Raises:
        StorageError: The folder cannot be created or written (read-only, no permission...).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise storage_error(exc, path) from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (UTF-8)."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def strict_json(value: Any, **options: Any) -> str:
    """``value`` as strict JSON text: NaN and infinite floats are written as ``null``.

    Python's ``json`` writes them as the bare words ``NaN`` and ``Infinity``, which are not JSON and which strict
    readers (JavaScript's ``JSON.parse``, ``jq``) refuse; every JSON file lipkit writes goes through here instead.

    Args:
        value: Dicts, lists, tuples, strings, numbers, booleans and None.
        **options: Passed on to :func:`json.dumps` (``indent``, ``sort_keys``, ``ensure_ascii``).
    """
    return json.dumps(_finite_or_null(value), allow_nan=False, **options)


def _finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite_or_null(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item) for item in value]
    return value


def atomic_temporaries(folder: Path, name: str = "*") -> list[Path]:
    """The temporary files that interrupted :func:`atomic_write` calls left in ``folder``.

    Args:
        folder: Where the files were being written.
        name: A glob for the names of the files being written (``step_*.pt``); every name by default.

    Returns:
        Files named as :func:`atomic_write` names its temporary files (``.NAME.RANDOM.tmp``), sorted by name.
    """
    return sorted(Path(folder).glob(f".{name}.*.tmp"))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; anything else is passed to ``torch.device``.

    Raises:
        ConfigError: ``name`` is not a device name, or names a CUDA device this machine does not have.
    """
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not a device name: use auto, cpu, cuda or cuda:N") from None
    check_device(device)
    return device


def check_device(device: torch.device) -> None:
    """Refuse a CUDA device that this machine does not have, before anything is put on it.

    Raises:
        ConfigError: One line naming the device and what the machine has.
    """
    import torch

    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        raise ConfigError(
            f"device {str(device)!r}: this machine has no CUDA device that torch can use; use cpu or auto"
        )
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        raise ConfigError(
            f"device {str(device)!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
        )


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

    The lock belongs to the process that took it alone. An ``flock`` is shared by every descriptor of the
    open file, and a forked child (a DataLoader worker) inherits one, so the lock would outlive a killed
    parent for as long as its workers linger; forked children therefore close their copy at once, and
    programs started with ``exec`` never receive one (``O_CLOEXEC``). ``flock`` rather than a POSIX record
    lock (``lockf``), which forked children do not inherit either, because a record lock is dropped when
    the process closes *any* descriptor of the file, and a second one taken in the same process succeeds.

    A folder that :meth:`acquire` created is removed again on :meth:`release` when nothing but the lock
    file is in it, so a job refused before it wrote anything (a resume that does not fit, bad data) leaves
    no empty folder behind.

    Raises:
        FolderInUseError: On :meth:`acquire` (or entering the context) while another process holds it.
        StorageError: On :meth:`acquire` when the folder or its lock file cannot be created (read-only, no permission).
    """

    def __init__(self, folder: Path, what: str = "a lipkit job") -> None:
        self.folder, self.what = Path(folder), what
        self.path = self.folder / ".lock"
        self._fd: int | None = None
        self._created: list[Path] = []  # the folders acquire made, innermost first

    def acquire(self) -> FolderLock:
        import fcntl
        import time

        missing = [p for p in (self.folder, *self.folder.parents) if not p.exists()]
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise storage_error(exc, self.folder) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUseError(
                f"cannot start {self.what} in {self.folder}: another process is working there ({holder}); "
                "wait for it to finish, or use another output folder"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.what}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self._fd, self._created = fd, missing
        _HELD_LOCKS.add(self)
        return self

    def release(self) -> None:
        if self._fd is not None:
            self._remove_unused_folders()  # while the lock is still held
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
        _HELD_LOCKS.discard(self)

    def _remove_unused_folders(self) -> None:
        """Remove the folders :meth:`acquire` created if the job left nothing in them but the lock file."""
        if not self._created or [p.name for p in self.folder.iterdir()] != [self.path.name]:
            return
        self.path.unlink()
        for folder in self._created:
            try:
                folder.rmdir()
            except OSError:  # another process put something there meanwhile
                return

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


_HELD_LOCKS: set[FolderLock] = set()  # the folder locks this process holds


def _close_inherited_locks() -> None:
    """In a forked child: close the lock descriptors inherited from the parent, so each lock dies with its holder."""
    for lock in _HELD_LOCKS:
        if lock._fd is not None:
            os.close(lock._fd)
            lock._fd = None
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_inherited_locks)


def _holder(fd: int) -> str:
    """Who holds a lock, as its file records it; a recorded process that has exited is not named as the holder."""
    text = os.read(fd, 200).decode(errors="replace").strip()
    recorded = re.search(r"pid (\d+)", text)
    if recorded and not _alive(int(recorded.group(1))):
        return f"pid {recorded.group(1)} took the lock and has exited; a process it started still holds it"
    return text or "unknown"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True

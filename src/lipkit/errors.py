"""User-facing errors.

Every error a user can cause (a bad name, a malformed config, a checkpoint that does not fit) raises a
subclass of :class:`LipkitError`, and so does a write that the file system refuses (:class:`StorageError`).
The CLI prints its message and exits non-zero without a traceback.
"""

from __future__ import annotations

import difflib
import errno
import os
from collections.abc import Iterable


class LipkitError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class ConfigError(LipkitError):
    """A configuration key, value or preset is invalid."""


class UnknownNameError(LipkitError, KeyError):
    """A registry lookup failed; the message lists the closest known names."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class CheckpointError(LipkitError):
    """A checkpoint cannot be read or does not fit the model."""


class FolderInUseError(LipkitError):
    """Another process is working in the same output folder (see :class:`lipkit.utils.FolderLock`)."""


class TrainingDivergedError(LipkitError):
    """The loss became NaN or infinite."""


class StorageError(LipkitError):
    """A file or folder cannot be written: the file system is read-only or full, or refuses the write."""


STORAGE_HINTS = {
    errno.EROFS: "write somewhere else",
    errno.EACCES: "write somewhere else, or give this user write permission",
    errno.EPERM: "write somewhere else, or give this user write permission",
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "free some space or write somewhere else",
}


def storage_error(exc: OSError, path: str | os.PathLike[str]) -> StorageError:
    """The one-line error for ``exc``, raised while writing ``path``.

    Args:
        exc: The operating system's error.
        path: What was being written (the destination, not a temporary file).

    Returns:
        ``cannot write PATH: CAUSE; HINT``, e.g. ``cannot write out/a.pt: read-only file system; write
        somewhere else``.
    """
    hint = STORAGE_HINTS.get(exc.errno or 0)
    return StorageError(f"cannot write {os.fspath(path)}: {os_error_cause(exc)}" + (f"; {hint}" if hint else ""))


def os_error_cause(exc: OSError) -> str:
    """The system's words for ``exc`` in lower case: ``read-only file system``, ``no space left on device``..."""
    text = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
    return text[:1].lower() + text[1:]


def describe_os_error(exc: OSError) -> str:
    """``PATH: CAUSE`` (or the cause alone when the error names no file), for an error nothing else caught."""
    return f"{exc.filename}: {os_error_cause(exc)}" if exc.filename is not None else os_error_cause(exc)


def find_os_error(exc: BaseException) -> OSError | None:
    """The first :class:`OSError` in ``exc``'s chain (itself, then its cause or context, and so on).

    A library that writes through a file object can wrap the file's ``OSError`` in its own error (``torch.save``
    raises ``RuntimeError: unexpected pos`` after a full disk); the operating system's error is what the user
    must see.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Return a ' Did you mean ...?' hint listing the closest of ``choices`` to ``name`` (or '')."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered in c.lower() or c.lower() in lowered][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""

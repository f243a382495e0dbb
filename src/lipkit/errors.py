"""User-facing errors.

Every error a user can cause (a bad name, a malformed config, a checkpoint that does not fit) raises a
subclass of :class:`LipkitError`. The CLI prints its message and exits non-zero without a traceback.
"""

from __future__ import annotations

import difflib
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


def suggest(name: str, choices: Iterable[str], n: int = 5) -> str:
    """Return a ' Did you mean ...?' hint listing the closest of ``choices`` to ``name`` (or '')."""
    choices = list(choices)
    close = difflib.get_close_matches(name, choices, n=n, cutoff=0.5)
    if not close:
        lowered = name.lower()
        close = [c for c in choices if lowered in c.lower() or c.lower() in lowered][:n]
    return f" Did you mean: {', '.join(close)}?" if close else ""

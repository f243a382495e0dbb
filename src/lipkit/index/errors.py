"""The errors of the search index: each is a :class:`~lipkit.errors.LipkitError` with one clear line."""

from __future__ import annotations

from lipkit.errors import LipkitError, UnknownNameError


class FilterError(LipkitError):
    """A ``where`` expression cannot be parsed or names a column the index does not have."""


class UnknownKeyError(UnknownNameError):
    """A key that the index does not hold (for "more like this", metadata, thumbnails)."""


class ModelMismatchError(LipkitError):
    """A query or an embeddings folder comes from another model than the one that made the index."""


class IndexFormatError(LipkitError):
    """An index folder is missing, damaged, or of another format; the message names the file and the fix."""


class QueryError(LipkitError):
    """A query cannot run: ``k`` or ``offset`` out of range, a vector of the wrong size, an empty combination."""

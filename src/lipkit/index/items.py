"""The items an embedding job covers: every pair of a data spec with its key, source, path and stamp.

An item's *stamp* is a short signature of its inputs, cheap to compute without decoding the image: for
an image file, its size and modification time with a hash of the caption; for a sample in a shard, the
shard's size and modification time; for generated pairs (emoji, synthetic), a hash of the caption. An
item whose stamp is unchanged is not embedded again.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lipkit.data.corpora import SOURCES
from lipkit.data.files import TABLE_EXTENSIONS
from lipkit.data.pairs import PairSource
from lipkit.data.shards import ShardPairs
from lipkit.data.spec import KeySubset, SourceSpec, Spec, open_entry, parse_spec
from lipkit.errors import LipkitError

# Metadata columns every item has; extra table columns with these names are left out
BASE_COLUMNS = ("key", "caption", "source", "path", "thumbnail", "width", "height")


@dataclass
class Listing:
    """What an embedding job knows of its items before decoding any image; item ``i`` is ``source[i]``.

    Attributes:
        source: The pairs, all entries of the spec end to end.
        keys: Item keys, unique.
        stamps: Item stamps (see the module docstring).
        sources: The name of each item's source (``emoji``, ``tuxpaint``, a folder or table name).
        paths: Each item's image file, or None (shards, generated pairs).
        extras: Extra table columns: name -> one value per item (None for items of other sources).
        skipped: Pairs the sources dropped when opened (no caption, truncated shards...), by reason.
    """

    source: PairSource
    keys: list[str]
    stamps: list[str]
    sources: list[str]
    paths: list[str | None]
    extras: dict[str, list[Any]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.keys)

    def metadata(self, indexes: Sequence[int]) -> dict[str, list[Any]]:
        """The listed columns of some items: key, source, path, extras and ``_stamp``."""
        columns = {"key": self.keys, "source": self.sources, "path": self.paths, **self.extras}
        picked = {name: [values[i] for i in indexes] for name, values in columns.items()}
        picked["_stamp"] = [self.stamps[i] for i in indexes]
        return picked


def list_items(spec: Spec, limit: int | None = None) -> Listing:
    """Open every source of a data spec and list its items (the first ``limit`` of them, if given).

    Raises:
        LipkitError: The spec is bad or names a missing source, or two items share a key.
    """
    from lipkit.data.spec import ConcatPairs

    entries = parse_spec(spec)
    if any(e.weight is not None for e in entries):
        raise LipkitError(f"data spec {spec!r}: weights are for training mixtures; list the sources without them")
    opened = [open_entry(e) for e in entries]
    source = opened[0] if len(opened) == 1 else ConcatPairs(opened)
    listing = Listing(source, [], [], [], [])
    for entry, part in zip(entries, opened):
        _append(listing, entry, part)
    if limit is not None:
        _truncate(listing, limit)
    _check_unique(listing.keys, spec)
    return listing


def _append(listing: Listing, entry: SourceSpec, source: PairSource) -> None:
    start = len(listing.keys)
    paths, stamps = describe(source)
    listing.keys += [source.key(i) for i in range(len(source))]
    listing.stamps += stamps
    listing.paths += paths
    listing.sources += [source_name(entry.source)] * len(source)
    for reason, n in getattr(source, "skipped", {}).items():
        listing.skipped[reason] = listing.skipped.get(reason, 0) + n
    if _is_table(entry.source):
        extras = table_extras(entry, [k for k in listing.keys[start:]])
        for name in set(listing.extras) | set(extras):
            column = listing.extras.setdefault(name, [None] * start)
            column += extras.get(name, [None] * len(source))
    else:
        for column in listing.extras.values():
            column += [None] * len(source)


def _truncate(listing: Listing, limit: int) -> None:
    if limit < 1:
        raise LipkitError(f"--limit must be at least 1, got {limit}")
    for name in ("keys", "stamps", "sources", "paths"):
        setattr(listing, name, getattr(listing, name)[:limit])
    listing.extras = {name: values[:limit] for name, values in listing.extras.items()}


def _check_unique(keys: list[str], spec: Spec) -> None:
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        twice = next(k for k in keys if k in seen or seen.add(k))
        raise LipkitError(f"data spec {spec!r}: key {twice!r} appears twice; embed those sources into separate folders")


def source_name(text: str) -> str:
    """The ``source`` metadata of a spec entry: a registered name, else the folder or table name."""
    name = text.partition(":")[0]
    if name in SOURCES and "/" not in text:
        return name
    path = Path(os.path.expanduser(text.rstrip("/")))
    if text.endswith(".tar") or "{" in text or "*" in text:
        return path.parent.name or path.stem
    return path.stem if _is_table(text) else path.name


def _is_table(text: str) -> bool:
    return Path(text).suffix.lower() in TABLE_EXTENSIONS and text.partition(":")[0] not in SOURCES


@functools.singledispatch
def describe(source: PairSource) -> tuple[list[str | None], list[str]]:
    """The image file (or None) and the stamp of each pair of a source.

    Sources that list their pairs (``source.pairs``: folders, tables, Tux Paint) have files; other
    sources' pairs are generated from their caption alone.
    """
    if "pairs" not in vars(source):
        return [None] * len(source), [_text_hash(source.caption(i)) for i in range(len(source))]
    paths = [str(p.image_path) for p in source.pairs]
    stamps = [f"{file_stamp(p.image_path)}:{_text_hash(p.caption or '')}" for p in source.pairs]
    return paths, stamps


@describe.register
def _(source: ShardPairs) -> tuple[list[str | None], list[str]]:
    shard_stamps = [file_stamp(Path(p)) for p in source.paths]
    return [None] * len(source), [shard_stamps[s] for s in source.shard_of.tolist()]


@describe.register
def _(source: KeySubset) -> tuple[list[str | None], list[str]]:
    paths, stamps = describe(source.source)
    return [paths[i] for i in source.indexes.tolist()], [stamps[i] for i in source.indexes.tolist()]


def file_stamp(path: Path) -> str:
    """``SIZE:MTIME_NS`` of a file, or ``missing``."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _text_hash(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def table_extras(entry: SourceSpec, keys: list[str]) -> dict[str, list[Any]]:
    """The table's columns other than its image and caption columns, for the listed rows (keys ``NAME#ROW``)."""
    from lipkit.data.files import CAPTION_COLUMNS, IMAGE_COLUMNS, pick_column, read_columns

    path = Path(os.path.expanduser(entry.source))
    columns = read_columns(path)
    used = {
        pick_column(path, columns, entry.image_col, IMAGE_COLUMNS, "image"),
        pick_column(path, columns, entry.caption_col, CAPTION_COLUMNS, "caption"),
    }
    rows = [int(k.rpartition("#")[2]) for k in keys]
    return {
        name: _typed([values[r] for r in rows])
        for name, values in columns.items()
        if name not in used and name not in BASE_COLUMNS and not name.startswith("_")
    }


def _typed(values: list[Any]) -> list[Any]:
    """Cells as Python values: CSV text (bytes) decoded, and as numbers when every filled cell is one."""
    from lipkit.data.files import cell_text

    texts = [cell_text(v)[0] if isinstance(v, bytes) else v for v in values]
    if not all(isinstance(v, str) or v is None for v in texts):
        return texts
    for kind in (int, float):
        try:
            return [kind(v) if v not in (None, "") else None for v in texts]
        except ValueError:
            continue
    return texts

"""Data specs: which sources to train on, and how to mix them.

A spec is a string of comma-separated entries, or a list of entries (in a YAML config)::

    ENTRY   = SOURCE [ "::" WEIGHT ]
    SOURCE  = NAME[:SPLIT]            registered sources: synthetic, tuxpaint, emoji (split: train/val/test/all),
                                      prototypes (classifier prototypes, :mod:`lipkit.data.prototypes`)
            | PATTERN.tar             webdataset shards; {000..099} ranges, {a,b} alternatives and * globs
            | DIR                     a folder of .tar shards, else a folder of images with .txt/.json captions
            | TABLE.csv|.tsv|.parquet image-path and caption columns (found by name; set them in a mapping)
            | s3://, gs://, http(s)://  the same shard patterns and folders, remote (read through fsspec)
            | pipe:COMMAND            OpenCLIP's form: a command writing a shard to its output (copied once)

    data.train=/data/laion/{00000..00999}.tar
    data.train="/data/cc3m/{0000..0331}.tar::0.7,tuxpaint:train::0.3"
    data.train=s3://bucket/laion/{00000..00999}.tar
    data:
      train:
        - /data/cc3m/{0000..0331}.tar::0.7
        - {source: /data/pairs.parquet, weight: 0.3, image_col: filepath, caption_col: title}
        - {source: prototypes, weight: 0.2, options: {placement: norm}}   # a registered source's options
        - {source: tuxpaint:all, keys: curated/keys.txt}   # only the pairs whose keys the file lists

Commas inside braces belong to the pattern. Without weights, sources are concatenated (each sample once
per epoch); with weights (all entries need one), each epoch draws that share of its samples from each
source. Named sources win over paths: write ``./emoji`` for a folder called ``emoji``.

:func:`open_mixture` opens a spec for training; :func:`open_source` opens one for evaluation, as a
single source.
"""

from __future__ import annotations

import bisect
import glob
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lipkit.data.corpora import SOURCES, open_named
from lipkit.data.files import TABLE_EXTENSIONS, FilePairs, folder_pairs, table_pairs
from lipkit.data.order import Layout
from lipkit.data.pairs import PairSource
from lipkit.data.shards import ShardPairs, is_remote, remote_folder_shards, resolve_shards
from lipkit.errors import LipkitError, suggest

Spec = str | Sequence[str | Mapping[str, Any]]


@dataclass(frozen=True)
class SourceSpec:
    """One entry of a data spec.

    Attributes:
        source: A registered ``NAME[:SPLIT]``, a shard pattern, a folder or a table.
        weight: Mixing weight (``None``: proportional to size).
        image_col: Table column of image paths (found by name when ``None``).
        caption_col: Table column of captions (found by name when ``None``).
        options: Keyword options of a registered source (e.g. ``{placement: norm}`` for ``prototypes``).
        keys: A text file of sample keys, one per line (``keys.txt`` of ``lipkit data curate``): only the
            source's pairs with those keys are used, in the source's order.
    """

    source: str
    weight: float | None = None
    image_col: str | None = None
    caption_col: str | None = None
    options: Mapping[str, Any] | None = None
    keys: str | None = None


def parse_spec(spec: Spec) -> list[SourceSpec]:
    """Parse a spec string or list into entries, checking the syntax only (nothing is opened).

    Raises:
        LipkitError: Empty entries, a bad weight, unknown mapping keys, or weights on only some entries.
    """
    items = split_entries(spec) if isinstance(spec, str) else list(spec)
    if not items:
        raise LipkitError("the data spec is empty")
    entries = [_parse_item(item) for item in items]
    weighted = [e.weight is not None for e in entries]
    if any(weighted) and not all(weighted):
        raise LipkitError(f"data spec {spec!r}: give every source a weight (SOURCE::WEIGHT) or none")
    return entries


def split_entries(spec: str) -> list[str]:
    """Split at commas outside braces: ``a/{0,1}.tar,b`` -> [``a/{0,1}.tar``, ``b``]."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(spec):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(spec[last:i])
            last = i + 1
    parts.append(spec[last:])
    if any(not p.strip() for p in parts):
        raise LipkitError(f"data spec {spec!r} has an empty entry")
    return [p.strip() for p in parts]


def _parse_item(item: str | Mapping[str, Any]) -> SourceSpec:
    if isinstance(item, Mapping):
        return _parse_mapping(item)
    if not isinstance(item, str) or not item.strip():
        raise LipkitError(f"a data source entry must be a string or a mapping, got {item!r}")
    source, sep, weight = item.strip().rpartition("::")
    return SourceSpec(source, _weight(weight, source)) if sep else SourceSpec(item.strip())


def _parse_mapping(item: Mapping[str, Any]) -> SourceSpec:
    known = [f.name for f in fields(SourceSpec)]
    for key in item:
        if key not in known:
            raise LipkitError(f"unknown data source option {key!r}.{suggest(str(key), known)} Known: {known}")
    if not isinstance(item.get("source"), str):
        raise LipkitError(f"data source entry {dict(item)} needs a 'source' string")
    if not isinstance(item.get("options") or {}, Mapping):
        raise LipkitError(f"data source {item['source']!r}: options must be a mapping, got {item['options']!r}")
    weight = item.get("weight")
    return SourceSpec(**{**item, "weight": None if weight is None else _weight(str(weight), item["source"])})


def _weight(text: str, source: str) -> float:
    try:
        weight = float(text)
    except ValueError:
        raise LipkitError(f"data source {source!r}: weight {text!r} is not a number") from None
    if not weight > 0 or weight == float("inf"):
        raise LipkitError(f"data source {source!r}: weight must be positive, got {text}")
    return weight


def open_entry(entry: SourceSpec) -> PairSource:
    """Open the source one entry names (only the pairs of its key list, when it has one)."""
    source = _open_source(entry)
    return KeySubset(source, entry.keys) if entry.keys else source


def _open_source(entry: SourceSpec) -> PairSource:
    if entry.source.partition(":")[0] in SOURCES and "/" not in entry.source:
        return open_named(entry.source, **(entry.options or {}))
    if entry.options:
        raise LipkitError(f"data source {entry.source!r}: options apply to registered sources only")
    return _open_path(entry)


def _open_path(entry: SourceSpec) -> PairSource:
    text = entry.source
    if is_remote(text):  # shards in object storage or on a web server, or OpenCLIP's pipe: form
        if text.endswith(".tar") or glob.has_magic(text) or "{" in text or text.startswith("pipe:"):
            return ShardPairs(resolve_shards(text), text)
        return ShardPairs(remote_folder_shards(text), text)
    path = Path(os.path.expanduser(text))
    if text.endswith(".tar") or glob.has_magic(text) or "{" in text:
        return ShardPairs(resolve_shards(text), text)
    if path.suffix.lower() in TABLE_EXTENSIONS:
        return FilePairs(table_pairs(path, entry.image_col, entry.caption_col), text)
    if path.is_dir():
        tars = sorted(path.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
        return ShardPairs(tars, text) if tars else _open_folder(path, text)
    if "/" in text or path.suffix or path.exists():
        raise LipkitError(f"data path {text!r} does not exist")
    return open_named(text)  # neither a path nor a known name: the registry suggests the closest names


def _open_folder(path: Path, text: str) -> PairSource:
    try:
        return FilePairs(folder_pairs(path), text)
    except LipkitError:
        split_dirs = [d.name for d in sorted(path.iterdir()) if d.is_dir() and any(d.glob("*.tar"))]
        if split_dirs:
            raise LipkitError(
                f"{text} holds shard folders ({', '.join(split_dirs)}): name one, e.g. {path / split_dirs[0]}"
            ) from None
        raise


class ConcatPairs(PairSource):
    """Several sources end to end in one index space (component ``c`` starts at ``offsets[c]``)."""

    def __init__(self, sources: Sequence[PairSource]) -> None:
        self.sources = list(sources)
        self.offsets = [0, *np.cumsum([len(s) for s in self.sources]).tolist()]

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[PairSource, int]:
        c = bisect.bisect_right(self.offsets, index) - 1
        return self.sources[c], index - self.offsets[c]

    def key(self, index: int) -> str:
        source, i = self._locate(index)
        return source.key(i)

    def caption(self, index: int) -> str:
        source, i = self._locate(index)
        return source.caption(i)

    def image(self, index: int, draft: tuple[int, int] | None = None) -> Image.Image:
        source, i = self._locate(index)
        return source.image(i, draft)

    def groups(self) -> np.ndarray | None:
        if len(self.sources) == 1:
            return self.sources[0].groups()
        return None

    def prefetch(self, indexes: Sequence[int]) -> None:
        parts: dict[int, list[int]] = {}
        for index in indexes:
            c = bisect.bisect_right(self.offsets, index) - 1
            parts.setdefault(c, []).append(index - self.offsets[c])
        for c, local in parts.items():
            self.sources[c].prefetch(local)


class KeySubset(PairSource):
    """The pairs of a source whose keys a key file lists, in the source's order.

    Keys of the file that the source does not hold are ignored (one file can list the keys of several
    sources); a file that names none of the source's pairs is an error.
    """

    def __init__(self, source: PairSource, keys_file: str) -> None:
        try:
            wanted = set(Path(os.path.expanduser(keys_file)).read_text("utf-8").splitlines()) - {""}
        except (OSError, UnicodeDecodeError) as exc:
            raise LipkitError(f"cannot read the key list {keys_file}: {exc}") from None
        self.source = source
        self.indexes = np.array([i for i in range(len(source)) if source.key(i) in wanted], np.int64)
        if not len(self.indexes):
            raise LipkitError(f"the key list {keys_file} names none of the pairs of this source")
        self.skipped = dict(getattr(source, "skipped", {}))

    def __len__(self) -> int:
        return len(self.indexes)

    def key(self, index: int) -> str:
        return self.source.key(int(self.indexes[index]))

    def caption(self, index: int) -> str:
        return self.source.caption(int(self.indexes[index]))

    def image(self, index: int, draft: tuple[int, int] | None = None) -> Image.Image:
        return self.source.image(int(self.indexes[index]), draft)

    def groups(self) -> np.ndarray | None:
        bounds = self.source.groups()
        return None if bounds is None else np.searchsorted(self.indexes, bounds)

    def prefetch(self, indexes: Sequence[int]) -> None:
        self.source.prefetch(self.indexes[np.asarray(indexes, np.int64)].tolist())


@dataclass
class Mixture:
    """Opened sources with their mixing weights (normalised to sum to 1).

    Attributes:
        sources: The sources, in spec order.
        weights: Mixing weights.
        names: The spec entry of each source.
        weighted: Whether the spec gave weights (else they are proportional to the sizes).
    """

    sources: list[PairSource]
    weights: list[float]
    names: list[str]
    weighted: bool = False

    @classmethod
    def of(cls, source: PairSource, name: str = "data") -> Mixture:
        """A single source as a mixture."""
        return cls([source], [1.0], [name])

    def layout(self) -> Layout:
        """The sampler's view: sizes, weights and shard boundaries of each source."""
        return Layout(tuple(len(s) for s in self.sources), tuple(self.weights), tuple(s.groups() for s in self.sources))

    def concatenated(self) -> PairSource:
        """The sources end to end: the index space the sampler's layout describes."""
        return self.sources[0] if len(self.sources) == 1 else ConcatPairs(self.sources)

    def as_source(self) -> PairSource:
        """All sources as one, for evaluation; a weighted mixture is refused (its weights would be lost)."""
        if self.weighted and len(self.sources) > 1:
            raise LipkitError(f"a weighted mixture ({', '.join(self.names)}) is for training; name a single source")
        return self.concatenated()

    @property
    def skipped(self) -> dict[str, int]:
        """Samples dropped while opening the sources (truncated shards, missing captions...), by reason."""
        total: dict[str, int] = {}
        for source in self.sources:
            for reason, n in getattr(source, "skipped", {}).items():
                total[reason] = total.get(reason, 0) + n
        return total


def open_mixture(spec: Spec) -> Mixture:
    """Open every source of a spec (see the module docstring)."""
    entries = parse_spec(spec)
    sources = [open_entry(e) for e in entries]
    if entries[0].weight is None:
        raw = [float(len(s)) for s in sources]
    else:
        raw = [float(e.weight) for e in entries]
    total = sum(raw)
    return Mixture(sources, [w / total for w in raw], [e.source for e in entries], entries[0].weight is not None)


def open_source(spec: Spec) -> PairSource:
    """Open a spec as one source: ``NAME[:SPLIT]``, a shard pattern, a table or a folder.

    Several comma-separated sources without weights are concatenated; weighted ones are refused.
    """
    return open_mixture(spec).as_source()

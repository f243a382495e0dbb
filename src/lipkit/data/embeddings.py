"""The embeddings folder that ``lipkit embed`` writes and ``lipkit index build`` and ``lipkit data curate`` read.

Its manifest holds a :class:`ModelRecord`, the model that made the vectors, so that a query is only ever
compared with vectors of the same model.

Layout of a folder ``OUT``::

    OUT/manifest.json            what the folder holds: format, model record, modalities, data spec, parts
    OUT/part-00000.image.npy     float32 (N, D), L2-normalised; row i is item i of the part
    OUT/part-00000.text.npy      the same for the captions
    OUT/part-00000.parquet       one row per item: key, caption, source, path, thumbnail, width, height,
                                 any extra table columns (and ``_stamp``, the item's input signature)

Every file is written atomically, and a part's Parquet file is written last: it is the part's commit
point. Its file metadata (``lipkit``) records the part's input digest and the items that could not be
embedded, so a part is self-describing; ``manifest.json`` lists the parts that are finished and is
rewritten after each one. Columns whose name starts with ``_`` are the job's own and are not metadata.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lipkit.errors import LipkitError
from lipkit.utils import atomic_write, atomic_write_text, strict_json

FORMAT = "lipkit-embeddings"
VERSION = 1
MANIFEST = "manifest.json"
STAMP = "_stamp"
_PART_NAME = re.compile(r"^part-(\d{5,})$")


@dataclass(frozen=True)
class ModelRecord:
    """Which model made a set of vectors.

    Attributes:
        fingerprint: :func:`lipkit.models.fingerprint.model_fingerprint` of the model.
        embed_dim: Width of its embeddings.
        config: A model config name, or the config as a dict (what :func:`lipkit.config.to_dict` gives).
        checkpoint: Absolute path of the weights, or None for a model that was never saved.
    """

    fingerprint: str
    embed_dim: int
    config: str | dict[str, Any]
    checkpoint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The record as plain JSON values."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelRecord:
        """Read a record written by :meth:`to_dict`.

        Raises:
            LipkitError: A field is missing.
        """
        try:
            return cls(str(data["fingerprint"]), int(data["embed_dim"]), data["config"], data.get("checkpoint"))
        except (KeyError, TypeError, ValueError) as exc:
            raise LipkitError(f"not a model record ({exc!s} missing or wrong): {data!r:.200}") from None


class EmbeddingsError(LipkitError):
    """An embeddings folder is missing, damaged, or not one."""


@dataclass
class EmbeddingPart:
    """One part of an embeddings folder.

    Attributes:
        name: The part's name, e.g. ``part-00000``.
        keys: Item keys, unique in the folder.
        vectors: Modality (``image``, ``text``) -> float32 (N, D) unit rows, row i for ``keys[i]``.
        metadata: One dict per item: caption, source, path, thumbnail (JPEG bytes or None) and extras.
    """

    name: str
    keys: list[str]
    vectors: dict[str, np.ndarray]
    metadata: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.keys)


@dataclass
class PartInfo:
    """What the manifest says of one finished part.

    Attributes:
        rows: Items in the part.
        input: Digest of the part's inputs (keys and their stamps, model and settings).
        skipped: Items of the part that could not be embedded, by reason.
        failed: ``[key, stamp, reason]`` of each such item (kept in the part's Parquet metadata only).
    """

    rows: int
    input: str
    skipped: dict[str, int] = field(default_factory=dict)
    failed: list[list[str]] = field(default_factory=list)

    def to_manifest(self) -> dict[str, Any]:
        return {"rows": self.rows, "input": self.input, "skipped": self.skipped}


def part_name(number: int) -> str:
    """``part-00042`` for 42."""
    return f"part-{number:05d}"


def part_number(name: str) -> int | None:
    """42 for ``part-00042``; None for any other name."""
    match = _PART_NAME.match(name)
    return int(match.group(1)) if match else None


class Embeddings:
    """An opened embeddings folder (see the module docstring); parts are read on demand.

    Attributes:
        path: The folder.
        record: The model that made the vectors.
        modalities: The vector sets each part holds (``image``, ``text``).
        data: The data spec the folder was made from.
        parts: Names of the finished parts, in order.
        manifest: The whole manifest.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path, self.manifest = path, manifest
        self.record = ModelRecord.from_dict(manifest["model"])
        self.modalities: list[str] = list(manifest["modalities"])
        self.data: str = manifest.get("data", "")
        self.parts: list[str] = sorted(manifest["parts"], key=lambda n: (part_number(n) or 0, n))

    def __len__(self) -> int:
        return sum(int(self.manifest["parts"][name]["rows"]) for name in self.parts)

    def __repr__(self) -> str:
        return f"Embeddings({str(self.path)!r}, {len(self)} items in {len(self.parts)} parts)"

    def iter_parts(self) -> Iterator[EmbeddingPart]:
        """Each finished part in order, read in full."""
        for name in self.parts:
            yield self.read_part(name)

    def read_part(self, name: str) -> EmbeddingPart:
        """Read one part.

        Raises:
            EmbeddingsError: A file of the part is missing or damaged, or the files disagree on its size.
        """
        columns, _ = read_table(self.path, name)
        keys = [str(k) for k in columns.pop("key")]
        vectors = {m: load_vectors(self.path, name, m) for m in self.modalities}
        expected = self.manifest["parts"][name]["rows"]
        for modality, array in vectors.items():
            if array.shape[0] != len(keys) or len(keys) != expected:
                raise EmbeddingsError(
                    f"{self.path}: {name} is damaged ({len(keys)} keys, {array.shape[0]} {modality} vectors, "
                    f"{expected} in the manifest); run `lipkit embed` again to redo it"
                )
        shown = [c for c in columns if not c.startswith("_")]
        metadata = [{c: columns[c][i] for c in shown} for i in range(len(keys))]
        return EmbeddingPart(name, keys, vectors, metadata)


def open_embeddings(path: str | Path) -> Embeddings:
    """Open an embeddings folder written by ``lipkit embed``.

    Raises:
        EmbeddingsError: No manifest there, or one of another format or version.
    """
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise EmbeddingsError(f"{path} is not an embeddings folder (no {MANIFEST}); make one with `lipkit embed`")
    return Embeddings(path, manifest)


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The folder's manifest, or None when it has none.

    Raises:
        EmbeddingsError: The manifest is unreadable, or of another format or version.
    """
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        manifest = json.loads(file.read_text("utf-8"))
    except (OSError, ValueError) as exc:
        raise EmbeddingsError(f"cannot read {file}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise EmbeddingsError(f"{file} is not a lipkit embeddings manifest")
    if manifest.get("version") != VERSION:
        raise EmbeddingsError(f"{file} has version {manifest.get('version')}; this lipkit reads version {VERSION}")
    for key in ("model", "modalities", "parts"):
        if key not in manifest:
            raise EmbeddingsError(f"{file} is damaged: it has no {key!r}")
    return manifest


def write_manifest(path: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest atomically (strict JSON)."""
    atomic_write_text(Path(path) / MANIFEST, strict_json(manifest, indent=1) + "\n")


def vectors_path(folder: Path, name: str, modality: str) -> Path:
    return Path(folder) / f"{name}.{modality}.npy"


def table_path(folder: Path, name: str) -> Path:
    return Path(folder) / f"{name}.parquet"


def load_vectors(folder: Path, name: str, modality: str, mmap: bool = False) -> np.ndarray:
    """One modality's vectors of a part.

    Raises:
        EmbeddingsError: The file is missing or damaged.
    """
    file = vectors_path(folder, name, modality)
    try:
        array = np.load(file, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise EmbeddingsError(f"cannot read {file}: {exc}; run `lipkit embed` again to redo the part") from None
    if array.ndim != 2 or array.dtype != np.float32:
        raise EmbeddingsError(f"{file} is not a float32 matrix ({array.dtype}, shape {array.shape})")
    return array


def read_table(folder: Path, name: str, columns: Sequence[str] | None = None) -> tuple[dict[str, list], PartInfo]:
    """A part's Parquet columns (all, or ``columns``) and its self-description.

    Raises:
        EmbeddingsError: The file is missing or damaged.
    """
    import pyarrow.parquet as pq

    file = table_path(folder, name)
    try:
        table = pq.read_table(file, columns=list(columns) if columns is not None else None)
        meta = json.loads((table.schema.metadata or {})[b"lipkit"])
        info = PartInfo(int(meta["rows"]), str(meta["input"]), dict(meta["skipped"]), list(meta["failed"]))
    except Exception as exc:  # pyarrow raises its own error types for every kind of bad file
        raise EmbeddingsError(f"cannot read {file}: {exc}; run `lipkit embed` again to redo the part") from None
    return table.to_pydict(), info


def write_part(folder: Path, name: str, vectors: dict[str, np.ndarray], rows: dict[str, list], info: PartInfo) -> None:
    """Write one part: the vector files, then its Parquet table (the commit point), each atomically.

    Args:
        folder: The embeddings folder.
        name: The part's name.
        vectors: Modality -> float32 (N, D).
        rows: Column name -> N values; ``key`` is required.
        info: The part's self-description, stored in the table's metadata.
    """
    for modality, array in vectors.items():
        data = np.ascontiguousarray(array, dtype=np.float32)
        atomic_write(vectors_path(folder, name, modality), lambda f, a=data: np.save(f, a, allow_pickle=False))
    table = _arrow_table(rows, info)
    atomic_write(table_path(folder, name), lambda f: _write_parquet(table, f))


def _arrow_table(rows: dict[str, list], info: PartInfo) -> Any:
    import pyarrow as pa

    meta = {"rows": info.rows, "input": info.input, "skipped": info.skipped, "failed": info.failed}
    arrays = {name: _arrow_column(values) for name, values in rows.items()}
    table = pa.table(arrays)
    return table.replace_schema_metadata({b"lipkit": strict_json(meta).encode()})


def _arrow_column(values: list) -> Any:
    """A column of whatever the values are; mixed types that Arrow cannot hold together become text."""
    import pyarrow as pa

    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return pa.array([None if v is None else str(v) for v in values], pa.string())


def _write_parquet(table: Any, f: io.BufferedWriter) -> None:
    import pyarrow.parquet as pq

    pq.write_table(table, f)

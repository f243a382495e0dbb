"""Image-caption pairs stored as plain files: a folder of images with caption sidecars, or a table.

* A folder holds images (``.jpg``, ``.png``, ``.webp``...) in any sub-folders, each with a sidecar of the
  same name: ``NAME.txt`` (the caption, whole file) or ``NAME.json`` (its ``caption`` or ``text`` field).
* A table (``.csv``, ``.tsv`` or ``.parquet``) has one row per pair: an image path (relative paths are
  read from the table's folder) and a caption. Columns are found by name, or given.

Both are listed in a stable order (sorted paths, table rows), which fixes keys and shard assignment
when packing. Entries without a caption are kept by the listing (the packer counts them) and dropped by
the map-style sources, with a warning.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

from lipkit.data.decode import IMAGE_FILE_SUFFIXES
from lipkit.data.pairs import Pair, PairSource
from lipkit.errors import LipkitError

TABLE_EXTENSIONS = (".csv", ".tsv", ".parquet")
IMAGE_COLUMNS = ("image", "image_path", "filepath", "file", "path", "filename", "img", "jpg")
CAPTION_COLUMNS = ("caption", "text", "title", "txt", "alt", "description")
PYARROW_INSTALL = "pip install pyarrow"


def folder_pairs(root: str | Path) -> list[Pair]:
    """Every image under ``root`` with its sidecar caption (``None`` when missing), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise LipkitError(f"image folder {root} does not exist")
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_FILE_SUFFIXES and p.is_file())
    if not images:
        raise LipkitError(f"no images ({', '.join(IMAGE_FILE_SUFFIXES)}) found under {root}")
    return [Pair(p.relative_to(root).as_posix(), p, sidecar_caption(p)) for p in images]


def sidecar_caption(image: Path) -> str | None:
    """The caption beside ``image``: ``NAME.txt``, else the ``caption``/``text`` field of ``NAME.json``."""
    txt, meta = image.with_suffix(".txt"), image.with_suffix(".json")
    try:
        if txt.is_file():
            return txt.read_text(encoding="utf-8", errors="replace").strip() or None
        if meta.is_file():
            data = json.loads(meta.read_text(encoding="utf-8"))
            text = data.get("caption", data.get("text")) if isinstance(data, dict) else None
            if text is not None:
                return str(text).strip() or None
    except (OSError, ValueError):
        return None
    return None


def table_pairs(path: str | Path, image_col: str | None = None, caption_col: str | None = None) -> list[Pair]:
    """One pair per row of a CSV, TSV or Parquet table, in row order (caption ``None`` when empty).

    Args:
        path: The table.
        image_col: Column of image paths; found among common names when ``None``.
        caption_col: Column of captions; found among common names when ``None``.

    Raises:
        LipkitError: The table is missing, unreadable, lacks a column (the message lists its columns) or
            holds URLs rather than local paths.
    """
    path = Path(path)
    columns = _read_table(path)
    image_col = _pick_column(path, columns, image_col, IMAGE_COLUMNS, "image")
    caption_col = _pick_column(path, columns, caption_col, CAPTION_COLUMNS, "caption")
    images, captions = columns[image_col], columns[caption_col]
    first = next((str(v) for v in images if v), "")
    if first.startswith(("http://", "https://", "s3://", "gs://")):
        raise LipkitError(
            f"column {image_col!r} of {path} holds URLs ({first[:60]}); lipkit reads local files: download "
            "them first (e.g. with img2dataset) and read its output shards instead"
        )
    pairs = []
    for row, (image, caption) in enumerate(zip(images, captions)):
        text = str(caption).strip() if caption is not None else ""
        pairs.append(Pair(f"{path.name}#{row}", path.parent / str(image or ""), text or None))
    return pairs


def _read_table(path: Path) -> dict[str, list]:
    if not path.is_file():
        raise LipkitError(f"table {path} does not exist")
    if path.suffix.lower() == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LipkitError(f"reading Parquet needs pyarrow; install it with `{PYARROW_INSTALL}`") from None
        try:
            return pq.read_table(path).to_pydict()
        except Exception as exc:  # pyarrow raises its own error types for every kind of bad file
            raise LipkitError(f"cannot read {path} as Parquet: {exc}") from None
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
            fields = list(rows[0].keys()) if rows else []
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LipkitError(f"cannot read {path} as a table: {exc}") from None
    return {name: [r.get(name) for r in rows] for name in fields}


def _pick_column(path: Path, columns: dict, given: str | None, candidates: tuple[str, ...], what: str) -> str:
    if given is None:
        given = next((c for c in candidates if c in columns), None)
        if given is None:
            raise LipkitError(
                f"table {path} has no {what} column (looked for {', '.join(candidates)}); its columns are: "
                f"{', '.join(columns) or '(none)'}; name one with --{what}-col / {what}_col"
            )
    elif given not in columns:
        raise LipkitError(
            f"table {path} has no {what} column {given!r}; its columns are: {', '.join(columns) or '(none)'}"
        )
    return given


class FilePairs(PairSource):
    """A map-style source over listed pairs, dropping (and counting) those without a caption.

    Args:
        pairs: The listing, e.g. from :func:`folder_pairs` or :func:`table_pairs`.
        name: What the listing came from, for messages.
    """

    def __init__(self, pairs: list[Pair], name: str) -> None:
        self.pairs = [p for p in pairs if p.caption]
        self.skipped = {"missing_caption": len(pairs) - len(self.pairs)}
        if self.skipped["missing_caption"]:
            warnings.warn(f"{name}: skipped {self.skipped['missing_caption']} images without a caption", stacklevel=2)
        if not self.pairs:
            raise LipkitError(f"{name} holds no captioned images")

"""Image-caption pairs stored as plain files: a folder of images with caption sidecars, or a table.

* A folder holds images (``.jpg``, ``.png``, ``.webp``...) in any sub-folders, each with a sidecar of the
  same name: ``NAME.txt`` (the caption, whole file) or ``NAME.json`` (its ``caption`` or ``text`` field).
* A table (``.csv``, ``.tsv`` or ``.parquet``) has one row per pair: an image path (relative paths are
  read from the table's folder) and a caption. Columns are found by name, or given.

Both are listed in a stable order (sorted paths, table rows), which fixes keys and shard assignment
when packing. Entries without a caption are kept by the listing (the packer counts them) and dropped by
the map-style sources, with a warning. Captions are decoded by the caption policy of
:func:`lipkit.data.decode.decode_text` (UTF-8, else Windows-1252); each pair records whether it needed
the fallback, and the sources and the packer count those pairs.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

from lipkit.data.decode import IMAGE_FILE_SUFFIXES, decode_text, warn_caption_fallbacks
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
    return [Pair(p.relative_to(root).as_posix(), p, *sidecar_caption(p)) for p in images]


def sidecar_caption(image: Path) -> tuple[str | None, bool]:
    """The caption beside ``image``: ``NAME.txt``, else the ``caption``/``text`` field of ``NAME.json``.

    Returns:
        The caption (``None`` when missing or unreadable), and whether its file was not UTF-8.
    """
    txt, meta = image.with_suffix(".txt"), image.with_suffix(".json")
    try:
        if txt.is_file():
            text, fell_back = read_text_file(txt)
            return text.strip() or None, fell_back
        if meta.is_file():
            text, fell_back = read_text_file(meta)
            data = json.loads(text)
            caption = data.get("caption", data.get("text")) if isinstance(data, dict) else None
            if caption is not None:
                return str(caption).strip() or None, fell_back
    except (OSError, ValueError):
        pass
    return None, False


def read_text_file(path: Path) -> tuple[str, bool]:
    """A caption file's text under the caption policy (:func:`decode_text`), with universal newlines.

    Returns:
        The text, and whether it was not UTF-8.

    Raises:
        OSError: The file cannot be read.
    """
    text, fell_back = decode_text(path.read_bytes())
    return text.replace("\r\n", "\n").replace("\r", "\n"), fell_back


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
    columns = read_columns(path)
    image_col = pick_column(path, columns, image_col, IMAGE_COLUMNS, "image")
    caption_col = pick_column(path, columns, caption_col, CAPTION_COLUMNS, "caption")
    images = [cell_text(v or "")[0] for v in columns[image_col]]
    first = next((v for v in images if v), "")
    if first.startswith(("http://", "https://", "s3://", "gs://")):
        raise LipkitError(
            f"column {image_col!r} of {path} holds URLs ({first[:60]}); lipkit reads local files: download "
            "them first (e.g. with img2dataset) and read its output shards instead"
        )
    pairs = []
    for row, (image, caption) in enumerate(zip(images, columns[caption_col])):
        text, fell_back = cell_text(caption)
        pairs.append(Pair(f"{path.name}#{row}", path.parent / image, text.strip() or None, fell_back))
    return pairs


def cell_text(value: object) -> tuple[str, bool]:
    """A table cell as text: bytes (CSV cells, Parquet binary) under the caption policy, ``None`` as "".

    Returns:
        The text, and whether it was not UTF-8 (see :func:`decode_text`).
    """
    if value is None:
        return "", False
    if isinstance(value, bytes):
        return decode_text(value)
    return str(value), False


def read_columns(path: Path) -> dict[str, list]:
    """The columns of a table by name; the cells of a CSV/TSV are bytes, decoded per cell by :func:`cell_text`.

    A CSV is parsed as Latin-1, which maps every byte to one character, so that its delimiters and quotes
    (ASCII, as in every encoding the policy reads) are found whatever the encoding of the cells.
    """
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
        with open(path, newline="", encoding="latin-1") as f:
            rows = list(csv.DictReader(f, delimiter="\t" if path.suffix.lower() == ".tsv" else ","))
            fields = [name for name in rows[0] if name is not None] if rows else []
    except (OSError, csv.Error) as exc:
        raise LipkitError(f"cannot read {path} as a table: {exc}") from None
    raw = {name: [None if r.get(name) is None else r[name].encode("latin-1") for r in rows] for name in fields}
    return {cell_text(name.encode("latin-1"))[0]: cells for name, cells in raw.items()}


def pick_column(path: Path, columns: dict, given: str | None, candidates: tuple[str, ...], what: str) -> str:
    """The column named ``given``, or else the first of ``candidates`` the table has (any case: LAION's ``TEXT``).

    Raises:
        LipkitError: No such column (the message lists the table's columns).
    """
    if given is None:
        lower = {name.lower(): name for name in reversed(list(columns))}
        given = next((c if c in columns else lower[c] for c in candidates if c in columns or c in lower), None)
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

    Attributes:
        skipped: Pairs dropped, by reason (``missing_caption``).
        caption_fallbacks: Captions served that were not UTF-8 (see :func:`decode_text`).
    """

    def __init__(self, pairs: list[Pair], name: str) -> None:
        self.pairs = [p for p in pairs if p.caption]
        self.skipped = {"missing_caption": len(pairs) - len(self.pairs)}
        self.caption_fallbacks = sum(p.caption_fallback for p in self.pairs)
        if self.skipped["missing_caption"]:
            warnings.warn(f"{name}: skipped {self.skipped['missing_caption']} images without a caption", stacklevel=2)
        warn_caption_fallbacks(name, self.caption_fallbacks)
        if not self.pairs:
            raise LipkitError(f"{name} holds no captioned images")

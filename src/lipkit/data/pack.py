"""Pack image-caption pairs into webdataset tar shards, in img2dataset's layout.

Output folder::

    00000.tar            000000000.jpg  000000000.txt  000000000.json  000000001.jpg ...
    00000_stats.json     what was written: count, successes, failures by reason, caption fallbacks, sizes,
                         seconds, packing settings
    00001.tar ...

Item ``i`` of the (sorted, hence stable) input goes to shard ``i // samples_per_shard`` under the key
``SSSSS`` + its position in the shard, as img2dataset names them; a failed item leaves a gap in the keys
rather than shifting the others. Images are shrunk to ``max_side`` (aspect kept; JPEGs are decoded
at a reduced DCT scale first) and encoded once; a JPEG that needs no resizing is copied unchanged.
Captions are stored as UTF-8; one that was not UTF-8 in the input was decoded by the fallback of
:func:`lipkit.data.decode.decode_text`, and is counted (``caption_fallbacks``) and warned about.

Shards are written under a temporary name and renamed when complete, then their stats file is written:
a shard with a stats file is finished and is skipped when the same packing runs again, so an interrupted
run resumes where it stopped and a reader never sees half a shard. Unreadable images and missing captions
are counted in the stats, never fatal. A packing locks its folder: a second one into the same folder is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import tarfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image
from tqdm.auto import tqdm

from lipkit.data.decode import (
    BadSample,
    UndecodableImage,
    encode_image,
    open_for_max_side,
    resize_max_side,
    warn_caption_fallbacks,
)
from lipkit.data.files import TABLE_EXTENSIONS, folder_pairs, table_pairs
from lipkit.errors import LipkitError
from lipkit.utils import FolderLock, atomic_write, atomic_write_text, strict_json

FORMATS = ("jpg", "png", "webp")


class MissingCaption(BadSample):
    """An item has no caption."""

    reason = "missing_caption"


@dataclass
class Decoded:
    """A loaded image: the (possibly draft-reduced) image, its original size, and its bytes if a plain JPEG."""

    image: Image.Image
    original_size: tuple[int, int]
    jpeg: bytes | None = None


class ImageRef(Protocol):
    """Where an item's image comes from; picklable, so that worker processes can load it."""

    def load(self, max_side: int | None) -> Decoded: ...


@dataclass(frozen=True)
class FileImage:
    """An image file."""

    path: Path

    def load(self, max_side: int | None) -> Decoded:
        """Read and decode the file (at a reduced JPEG scale when it will be shrunk to ``max_side``)."""
        try:
            data = Path(self.path).read_bytes()
        except OSError as exc:
            raise UndecodableImage(f"{self.path}: {exc.strerror or exc}") from None
        img, original = open_for_max_side(data, max_side)
        plain = img.format == "JPEG" and img.size == original and img.mode in ("RGB", "L")
        return Decoded(img, original, data if plain else None)


@dataclass(frozen=True)
class Item:
    """One pair to pack.

    Attributes:
        source: Where it came from (relative path, table row, corpus key); stored in the JSON.
        caption: The caption; ``None`` or empty counts as a missing caption.
        image: How to load the image.
        meta: Extra JSON fields (e.g. translations, tags).
        caption_fallback: The caption was not UTF-8 (see :func:`lipkit.data.decode.decode_text`).
    """

    source: str
    caption: str | None
    image: ImageRef
    meta: dict[str, Any] = field(default_factory=dict, hash=False)
    caption_fallback: bool = False


@dataclass(frozen=True)
class PackOptions:
    """How to pack.

    Attributes:
        samples_per_shard: Items per shard (successful samples are at most this many).
        max_side: Shrink images so that their longer side is at most this many pixels (``None``: keep).
        quality: JPEG / WebP quality.
        image_format: ``jpg``, ``png`` (lossless, keeps transparency) or ``webp``.
        workers: Processes writing shards in parallel (one shard per task).
    """

    samples_per_shard: int = 10_000
    max_side: int | None = None
    quality: int = 95
    image_format: str = "jpg"
    workers: int = 1

    def validate(self) -> None:
        """Check the options.

        Raises:
            LipkitError: A value is out of range.
        """
        if self.samples_per_shard < 1:
            raise LipkitError(f"samples per shard must be at least 1, got {self.samples_per_shard}")
        if self.max_side is not None and self.max_side < 8:
            raise LipkitError(f"max side must be at least 8 pixels, got {self.max_side}")
        if not 1 <= self.quality <= 100:
            raise LipkitError(f"quality must be in [1, 100], got {self.quality}")
        if self.image_format not in FORMATS:
            raise LipkitError(f"image format must be one of {', '.join(FORMATS)}, got {self.image_format!r}")
        if self.workers < 1:
            raise LipkitError(f"workers must be at least 1, got {self.workers}")


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its number, its items and where."""

    shard: int
    first: int
    items: list[Item]
    out: Path
    options: PackOptions
    settings: dict[str, Any]


@dataclass
class PackResult:
    """What :func:`pack` did.

    Attributes:
        out: The output folder.
        shards: Shards in the folder for this packing.
        written: Shards written by this run (the others were already finished).
        count: Items packed (or attempted).
        successes: Samples written.
        failures: Items left out, by reason.
        caption_fallbacks: Samples written whose caption was not UTF-8 (read by the fallback encoding).
    """

    out: Path
    shards: int
    written: int
    count: int
    successes: int
    failures: dict[str, int]
    caption_fallbacks: int = 0


def file_items(source: str | Path, image_col: str | None = None, caption_col: str | None = None) -> list[Item]:
    """Items from a folder of images with caption sidecars, or from a CSV/TSV/Parquet table.

    Raises:
        LipkitError: The source is missing, or a table lacks its columns (the message lists them).
    """
    path = Path(source)
    if path.is_dir():
        pairs = folder_pairs(path)
        return [Item(p.key, p.caption, FileImage(p.image_path), caption_fallback=p.caption_fallback) for p in pairs]
    if path.suffix.lower() in TABLE_EXTENSIONS:
        pairs = table_pairs(path, image_col, caption_col)
        return [
            Item(p.key, p.caption, FileImage(p.image_path), {"image": p.image_path.name}, p.caption_fallback)
            for p in pairs
        ]
    if path.exists():
        raise LipkitError(f"{source} is neither a folder nor a table ({', '.join(TABLE_EXTENSIONS)})")
    raise LipkitError(f"{source} does not exist")


def shard_name(shard: int) -> str:
    """``00042``: shard names are five digits, or more when needed."""
    return f"{shard:05d}"


def sample_key(shard: int, position: int, samples_per_shard: int) -> str:
    """img2dataset's key: the shard number then the position within the shard, both zero-padded."""
    return f"{shard_name(shard)}{position:0{len(str(max(1, samples_per_shard - 1)))}d}"


def pack(items: Sequence[Item], out: str | Path, options: PackOptions, progress: bool = True) -> PackResult:
    """Write ``items`` into tar shards in ``out``, skipping shards a previous run finished.

    The folder is locked while packing (:class:`~lipkit.utils.FolderLock`): a second packing into it is
    refused, rather than removing the temporary files of the first.

    Raises:
        LipkitError: Bad options, no items, or ``out`` holds shards packed from other items or settings.
        FolderInUseError: Another process is packing into ``out``.
        StorageError: ``out`` cannot be written (read-only, full, no permission).
    """
    options.validate()
    if not items:
        raise LipkitError("nothing to pack: the source holds no items")
    out = Path(out)
    with FolderLock(out, "packing shards"):
        _remove_stale_temporaries(out)
        settings = _settings(items, options)
        tasks = _plan(items, out, options, settings)
        check_existing(out, settings, "packed from other items or settings", "pack")
        todo = [t for t in tasks if not stats_path(out, t.shard).is_file()]
        done = sum(len(t.items) for t in tasks) - sum(len(t.items) for t in todo)
        with tqdm(total=len(items), initial=done, unit="img", desc=f"packing {out}", disable=not progress) as bar:
            for stats in _run(todo, options.workers):
                bar.update(stats["count"])
        return _summarise(out, tasks, len(todo))


def _settings(items: Sequence[Item], options: PackOptions) -> dict[str, Any]:
    """What must match for a re-run to reuse finished shards: the options and the list of items."""
    digest = hashlib.sha1("\n".join(item.source for item in items).encode("utf-8")).hexdigest()
    kept = {k: v for k, v in asdict(options).items() if k != "workers"}
    return {**kept, "items": len(items), "items_sha1": digest}


def _plan(items: Sequence[Item], out: Path, options: PackOptions, settings: dict[str, Any]) -> list[ShardTask]:
    n = options.samples_per_shard
    return [
        ShardTask(start // n, start, list(items[start : start + n]), out, options, settings)
        for start in range(0, len(items), n)
    ]


def stats_path(out: Path, shard: int) -> Path:
    """``OUT/NNNNN_stats.json``: a shard's stats, written last, so a shard that has them is finished."""
    return out / f"{shard_name(shard)}_stats.json"


def _remove_stale_temporaries(out: Path) -> None:
    """Remove the temporary files of a run that was killed (an atomic write's ``.NAME.XXXX.tmp``)."""
    for path in [*out.glob(".*.tar.*.tmp"), *out.glob(".*_stats.json.*.tmp")]:
        path.unlink(missing_ok=True)


def check_existing(out: Path, settings: dict[str, Any], origin: str, verb: str) -> None:
    """Refuse a folder whose finished shards were written with other ``settings`` (their stats record them).

    Args:
        out: The shard folder.
        settings: What this run's shards must share with the finished ones.
        origin: How the message says the old shards differ (``packed from other items or settings``).
        verb: What the message advises doing into a new folder (``pack``).

    Raises:
        LipkitError: Naming the differing settings.
    """
    for path in sorted(out.glob("*_stats.json")):
        try:
            previous = json.loads(path.read_text()).get("settings")
        except (OSError, ValueError):
            continue
        if previous != settings:
            changed = sorted(k for k in settings if previous is None or previous.get(k) != settings[k])
            raise LipkitError(
                f"{out} holds shards {origin} (differing: {', '.join(changed)}); "
                f"{verb} into a new folder or delete the old shards"
            )


def _run(tasks: list[ShardTask], workers: int) -> Iterator[dict[str, Any]]:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(write_shard, tasks)
        return
    with multiprocessing.get_context().Pool(min(workers, len(tasks))) as pool:
        yield from pool.imap_unordered(write_shard, tasks)


def write_shard(task: ShardTask) -> dict[str, Any]:
    """Write one shard (atomically), then its stats file; returns the stats."""
    start = time.perf_counter()
    failures: Counter[str] = Counter()
    sizes: list[tuple[int, int]] = []
    image_bytes = fallbacks = 0

    def fill(f: io.BufferedWriter) -> None:
        nonlocal image_bytes, fallbacks
        with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
            for position, item in enumerate(task.items):
                key = sample_key(task.shard, position, task.options.samples_per_shard)
                try:
                    files, size = encode_item(item, key, task.options)
                except BadSample as exc:
                    failures[exc.reason] += 1
                    continue
                for name, data in files.items():
                    add_member(tar, name, data)
                sizes.append(size)
                image_bytes += len(files[f"{key}.{task.options.image_format}"])
                fallbacks += item.caption_fallback

    tar_path = task.out / f"{shard_name(task.shard)}.tar"
    atomic_write(tar_path, fill)
    tar_path.chmod(0o644)  # the temporary file was private
    seconds = time.perf_counter() - start
    stats = _shard_stats(task, sizes, failures, fallbacks, image_bytes, tar_path.stat().st_size, seconds)
    atomic_write_text(stats_path(task.out, task.shard), strict_json(stats, indent=1) + "\n")
    stats_path(task.out, task.shard).chmod(0o644)
    return stats


def encode_item(item: Item, key: str, options: PackOptions) -> tuple[dict[str, bytes], tuple[int, int]]:
    """The tar members of one sample (``KEY.jpg``, ``KEY.txt``, ``KEY.json``) and its image size.

    Raises:
        BadSample: The caption is missing or the image cannot be decoded.
    """
    caption = (item.caption or "").strip()
    if not caption:
        raise MissingCaption(item.source)
    decoded = item.image.load(options.max_side)
    img = resize_max_side(decoded.image, options.max_side)
    if decoded.jpeg is not None and options.image_format == "jpg" and img.size == decoded.original_size:
        data = decoded.jpeg  # already a JPEG of the right size: no second lossy encoding
    else:
        data = encode_image(img, options.image_format, options.quality)
    meta = {
        "key": key,
        "caption": caption,
        "source": item.source,
        "status": "success",
        "width": img.size[0],
        "height": img.size[1],
        "original_width": decoded.original_size[0],
        "original_height": decoded.original_size[1],
        **item.meta,
    }
    files = {
        f"{key}.{options.image_format}": data,
        f"{key}.txt": caption.encode("utf-8"),
        f"{key}.json": strict_json(meta, ensure_ascii=False).encode("utf-8"),
    }
    return files, img.size


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    """Add a file member with fixed metadata (mode 644, time 0): the same input gives the same bytes."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    tar.addfile(info, io.BytesIO(data))


def _shard_stats(
    task: ShardTask,
    sizes: list[tuple[int, int]],
    failures: Counter[str],
    caption_fallbacks: int,
    image_bytes: int,
    tar_bytes: int,
    seconds: float,
) -> dict[str, Any]:
    widths, heights = [w for w, _ in sizes], [h for _, h in sizes]

    def spread(values: list[int]) -> dict[str, float]:
        return {"min": min(values), "max": max(values), "mean": round(sum(values) / len(values), 1)} if values else {}

    return {
        "shard": shard_name(task.shard),
        "first_item": task.first,
        "count": len(task.items),
        "successes": len(sizes),
        "failures": dict(sorted(failures.items())),
        "caption_fallbacks": caption_fallbacks,
        "tar_bytes": tar_bytes,
        "image_bytes": image_bytes,
        "width": spread(widths),
        "height": spread(heights),
        "seconds": round(seconds, 3),
        "settings": task.settings,
    }


def _summarise(out: Path, tasks: list[ShardTask], written: int) -> PackResult:
    count = successes = fallbacks = 0
    failures: Counter[str] = Counter()
    for task in tasks:
        stats = json.loads(stats_path(out, task.shard).read_text())
        count += stats["count"]
        successes += stats["successes"]
        fallbacks += stats.get("caption_fallbacks", 0)  # absent from the stats of older packings
        failures.update(stats["failures"])
    result = PackResult(out, len(tasks), written, count, successes, dict(sorted(failures.items())), fallbacks)
    warn_caption_fallbacks(f"packing {out}", fallbacks, stacklevel=4)
    return result

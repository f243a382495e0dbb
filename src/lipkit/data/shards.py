"""Webdataset tar shards read at random: each tar is indexed once, then samples are read by offset.

A shard is an uncompressed tar in webdataset's layout: consecutive members sharing a key (the path up to
the first dot of the file name) form one sample, e.g. ``000000042.jpg``, ``000000042.txt``,
``000000042.json``. :func:`index_tar` records where each sample's image and caption lie; the index is
cached (``$LIPKIT_CACHE_DIR/tar-index``, default ``~/.cache/lipkit``), keyed by the shard's path, size
and modification time, so it is rebuilt only when the shard changes. With the index, a list of shards
becomes a map-style source and the loader can use the same deterministic step -> batch sampler as any
other source, which gives exact resume.

Damage is skipped sample by sample. :func:`scan_tar` walks the headers itself: a block that is not a
valid header (bad checksum, malformed fields) is skipped, and the walk resynchronises on the next block
that is, so a corrupt header loses only the member it described and a truncated shard keeps everything
before the cut. A sample left without an image or a caption is counted as incomplete; samples of which
nothing could be read are counted as corrupt, from the number of samples that the shard's stats file
(``NNNNN_stats.json``, written by ``lipkit data pack`` and by img2dataset) says were written. The counts
are reported once, when the shards are opened. Captions are decoded by the caption policy of
:func:`lipkit.data.decode.decode_text` (UTF-8, else a counted fallback).
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import re
import tarfile
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from lipkit.data.decode import (
    SHARD_IMAGE_EXTENSIONS,
    UndecodableImage,
    UnreadableCaption,
    decode_text,
    open_image,
    warn_caption_fallbacks,
)
from lipkit.data.pairs import PairSource
from lipkit.errors import LipkitError, StorageError
from lipkit.utils import cache_root

INDEX_VERSION = 3
MAX_OPEN_FILES = 64
BLOCK = tarfile.BLOCKSIZE
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_CAPTION_EXTENSIONS = ("txt", "json")
# The first bytes of compressed files, which cannot be read at random.
COMPRESSED_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ\x00": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x04\x22\x4d\x18": "lz4",
    b"PK\x03\x04": "zip",
}


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{a,b}`` alternatives and zero-padded ``{000..099}`` ranges (nested too), in order."""
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, parts, last = 0, [], start + 1
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if depth == 1 and pattern[i] == ",":
            parts.append(pattern[last:i])
            last = i + 1
        elif depth == 0:
            parts.append(pattern[last:i])
            break
    else:
        raise LipkitError(f"unbalanced braces in {pattern!r}")
    head, tail = pattern[:start], expand_braces(pattern[i + 1 :])
    options = _range(parts[0]) if len(parts) == 1 else [x for p in parts for x in expand_braces(p)]
    return [head + option + rest for option in options for rest in tail]


def _range(body: str) -> list[str]:
    match = _RANGE.match(body)
    if not match:
        return ["{" + body + "}"]  # a literal brace pair, as in the shell
    a, b = match.groups()
    width = max(len(a), len(b)) if a.startswith("0") or b.startswith("0") else 0
    step = 1 if int(b) >= int(a) else -1
    return [str(v).zfill(width) for v in range(int(a), int(b) + step, step)]


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
REMOTE_READ_BLOCK = 8 << 20  # bytes per range request while a remote shard's headers are walked


def is_remote(name: str | Path) -> bool:
    """Whether a shard name is a URL that fsspec reads (``s3://``, ``gs://``, ``http(s)://``...) or OpenCLIP's
    ``pipe:COMMAND`` form, rather than a local path."""
    name = str(name)
    return name.startswith("pipe:") or (bool(_URL.match(name)) and not name.startswith("file://"))


def _url_to_fs(url: str) -> tuple[Any, str]:
    """A file system of this process's own for ``url`` (never fsspec's shared instance), and the path in it.

    Every one is closed before this process forks (:func:`_close_remote_sessions`): a forked child that
    closed an inherited connection would take its socket out of the event loop the parent shares with it,
    and the parent's next request would wait for ever.
    """
    try:
        from fsspec.core import url_to_fs
    except ImportError:
        raise LipkitError(f"reading {url} needs fsspec (and s3fs, gcsfs or aiohttp): pip install fsspec") from None
    try:
        fs, path = url_to_fs(url, skip_instance_cache=True)
    except (ImportError, ValueError) as exc:
        raise LipkitError(f"cannot read {url}: {exc}") from None
    global _FORK_HOOKED
    if not _FORK_HOOKED and hasattr(os, "register_at_fork"):
        os.register_at_fork(before=_close_remote_sessions)
        _FORK_HOOKED = True
    _LIVE_FS[id(fs)] = fs
    return fs, path


# by identity: fsspec's file systems compare equal when made with the same arguments, and a set would keep one of them
_LIVE_FS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_FORK_HOOKED = False


def _close_remote_sessions() -> None:
    """Close the connections of every remote file system this process opened (they reopen when next used)."""
    for fs in list(_LIVE_FS.values()):
        _close_session(fs)


def _close_session(fs: Any) -> None:
    close = getattr(type(fs), "close_session", None)
    for attribute in ("_session", "_s3"):  # fsspec's HTTP file system, s3fs
        session = getattr(fs, attribute, None)
        if close is not None and session is not None:
            with contextlib.suppress(Exception):  # closing is best effort: the session may be half gone
                close(getattr(fs, "loop", None), session)
            setattr(fs, attribute, None)
            _forget_finalizers(session)


def _forget_finalizers(session: Any) -> None:
    """Detach the finalizers that would close ``session`` again when its file system is collected.

    The session is closed already; in a forked child such a finalizer (fsspec registers one per session)
    waits on the parent's event loop, which no thread runs there, for seconds each time a discarded
    file system is collected: a loader worker's first batch took 3 s more.
    """
    for finalizer in list(getattr(weakref.finalize, "_registry", {})):
        info = finalizer.peek()
        if info is not None and any(arg is session for arg in info[2]):
            finalizer.detach()


def resolve_shards(pattern: str) -> list[Path | str]:
    """The tar files named by a brace pattern and/or glob, in pattern order: local paths, or URLs as given.

    Raises:
        LipkitError: Nothing matches the pattern, or some of the files it names explicitly are missing.
    """
    if is_remote(pattern):
        return _resolve_remote(pattern)
    found, missing = [], []
    for name in expand_braces(os.path.expanduser(pattern)):
        if glob.has_magic(name):
            found.extend(Path(p) for p in sorted(glob.glob(name)) if Path(p).is_file())
        elif Path(name).is_file():
            found.append(Path(name))
        else:
            missing.append(name)
    if not found:
        raise LipkitError(f"no shards match {pattern!r}")
    if missing:
        raise LipkitError(f"{len(missing)} of the shards named by {pattern!r} do not exist, e.g. {missing[0]}")
    return found


def _resolve_remote(pattern: str) -> list[Path | str]:
    """Remote shards: each brace expansion as it is (a missing one is reported when it is indexed), globs listed."""
    found: list[Path | str] = []
    for name in expand_braces(pattern):
        if glob.has_magic(name) and not name.startswith("pipe:"):
            fs, path = _url_to_fs(name)
            found += [fs.unstrip_protocol(p) for p in sorted(fs.glob(path))]
            _close_session(fs)
        else:
            found.append(name)
    if not found:
        raise LipkitError(f"no shards match {pattern!r}")
    return found


def remote_folder_shards(url: str) -> list[str]:
    """The ``.tar`` files in a remote folder, in the order of their names (as for a local folder).

    Raises:
        LipkitError: The folder holds none.
    """
    fs, path = _url_to_fs(url)
    names = sorted(fs.glob(path.rstrip("/") + "/*.tar"), key=lambda p: (len(p), p))
    _close_session(fs)
    if not names:
        raise LipkitError(f"no .tar shards in {url}")
    return [fs.unstrip_protocol(p) for p in names]


@dataclass
class TarIndex:
    """Where the samples of one shard lie, and what the shard lost.

    Attributes:
        keys: Sample keys, UTF-8 bytes (a compact array).
        image: (N, 2) offsets and sizes of the image members.
        text: (N, 2) offsets and sizes of the caption members.
        text_is_json: (N,) whether the caption is the ``caption`` field of a ``.json`` member.
        incomplete: Samples found without an image or a caption (written so, or left so by damage).
        truncated: The tar ends early (inside a member, or before its end-of-archive blocks).
        corrupt: Samples of which nothing could be read (under corrupt headers, past a truncation): those
            the shard's stats file says were written, less those found. Without a stats file, the samples
            whose keys are still legible in corrupt headers and were found nowhere else: a lower bound.
        damaged: Corrupt regions: runs of blocks that are neither a valid header, a member's data nor zeros.
        uncounted: The shard is damaged and has no stats file, so ``corrupt`` is a lower bound: samples lost
            with no legible header (past a truncation, or under an unreadable name) are not counted.
        caption_fallbacks: Captions of the samples that are not UTF-8.
    """

    keys: np.ndarray
    image: np.ndarray
    text: np.ndarray
    text_is_json: np.ndarray
    incomplete: int = 0
    truncated: bool = False
    corrupt: int = 0
    damaged: int = 0
    uncounted: bool = False
    caption_fallbacks: int = 0

    def __len__(self) -> int:
        return len(self.keys)


_COUNTS = ("incomplete", "corrupt", "damaged", "caption_fallbacks")  # the scalar fields, as cached
_FLAGS = ("truncated", "uncounted")


@dataclass
class TarScan:
    """What one walk over a tar's headers found.

    Attributes:
        members: Offset and size of each file member's data, by sample key, then extension.
        not_utf8: Data offsets of the caption members (``.txt``, ``.json``) that are not UTF-8.
        headers: Valid headers found.
        damaged: Corrupt regions (see :class:`TarIndex`).
        tar_like: Some block that is not a valid header still holds the ``ustar`` magic of a tar header.
        truncated: The file ends inside a member or a block, or before two zero blocks end the archive.
        legible: Sample keys read from the name field of corrupt headers (those with the ``ustar`` magic, a
            UTF-8 printable name and a shard member's extension).
    """

    members: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)
    not_utf8: set[int] = field(default_factory=set)
    legible: set[str] = field(default_factory=set)
    headers: int = 0
    damaged: int = 0
    tar_like: bool = False
    truncated: bool = False


def split_member(name: str) -> tuple[str, str]:
    """Webdataset's key and extension of a member name: ``a/b.seg.png`` -> (``a/b``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_tar(path: Path) -> TarIndex:
    """Walk a tar's headers (not its images) and record every complete sample, skipping damage.

    Raises:
        LipkitError: The file is compressed, or nothing says that it is a tar: no block of it is (even a
            corrupt) tar header, and no stats file beside it says how many samples were written to it.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        _refuse_compressed(path, f.read(BLOCK))
        scan = scan_tar(f, size)
    return _finish_index(scan, path, lambda: written_samples(path))


def _finish_index(scan: TarScan, path: Path | str, written_samples: Callable[[], int | None]) -> TarIndex:
    """The index of a scanned shard, with what its damage lost counted by its stats file where it has one."""
    index = _build_index(scan)
    if index.truncated or index.damaged:
        written = written_samples()
        if written is None and not scan.headers and scan.damaged and not scan.tar_like:
            raise LipkitError(
                f"{path} is not an uncompressed tar (no block of it is a tar header); compressed shards cannot "
                "be read at random, decompress them first"
            )
        index.uncounted = written is None
        if written is None:  # a lower bound: the samples named by corrupt headers and found nowhere else
            index.corrupt = len(scan.legible - scan.members.keys())
        else:
            index.corrupt = max(0, written - len(index) - index.incomplete)
    return index


def _refuse_compressed(path: Path | str, first: bytes) -> None:
    kind = next((kind for magic, kind in COMPRESSED_MAGIC.items() if first.startswith(magic)), None)
    if kind is None:
        return
    with contextlib.suppress(tarfile.HeaderError):
        if _header(first) is not None:
            return  # a tar whose first member's name happens to start like a compressed file
    raise LipkitError(
        f"{path} is not an uncompressed tar ({kind} data); compressed shards cannot be read at random, "
        "decompress them first"
    )


def scan_tar(f: BinaryIO, size: int) -> TarScan:
    """Walk the headers of the tar in ``f`` (``size`` bytes long) from the start, resynchronising after damage.

    A block that is neither zeros nor a valid header is skipped, and the walk goes on at the next block
    that is a valid header: the skipped blocks form one corrupt region. A member whose data runs past the
    end of the file ends the walk.
    """
    scan, offset, zeros, extended = TarScan(), 0, 0, {}
    in_damage = False
    while offset + BLOCK <= size:
        f.seek(offset)
        block = f.read(BLOCK)
        try:
            info = _header(block)
        except tarfile.HeaderError:
            scan.damaged += not in_damage
            if block[257:262] == b"ustar":
                scan.tar_like = True
                _note_legible_key(scan, block)
            in_damage, extended, offset = True, {}, offset + BLOCK
            continue
        if info is None:  # zeros: padding, or the end of the archive
            zeros, offset = zeros + 1, offset + BLOCK
            continue
        in_damage, zeros = False, 0
        scan.headers += 1
        data_size = int(extended.get("size", info.size))
        if offset + BLOCK + data_size > size:
            scan.truncated = True
            return scan
        extended = _take_member(f, scan, info, extended, offset + BLOCK, data_size)
        offset += BLOCK + -(-data_size // BLOCK) * BLOCK  # the data is padded to whole blocks
    f.seek(offset)
    scan.truncated = zeros < 2 or any(f.read(BLOCK))
    return scan


def _note_legible_key(scan: TarScan, block: bytes) -> None:
    """Record the sample key in a corrupt header's name field, if it reads as a shard member's name."""
    try:
        name = block[:100].split(b"\0", 1)[0].decode("utf-8")
    except UnicodeDecodeError:
        return
    key, ext = split_member(name)
    if key and name.isprintable() and (ext in SHARD_IMAGE_EXTENSIONS or ext in _CAPTION_EXTENSIONS):
        scan.legible.add(key)


def _header(block: bytes) -> tarfile.TarInfo | None:
    """The tar header in ``block``; ``None`` for a zero block.

    Raises:
        tarfile.HeaderError: ``block`` is not a sane header: a bad checksum, a malformed number, no name,
            a negative size, or a magic that is neither ustar's (POSIX and GNU) nor empty (V7).
    """
    try:
        info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.EOFHeaderError:
        return None
    if not info.name or info.size < 0 or not (block[257:262] == b"ustar" or not any(block[257:265])):
        raise tarfile.InvalidHeaderError("a header without a name, with a negative size or a foreign magic")
    return info


def _take_member(
    f: BinaryIO, scan: TarScan, info: tarfile.TarInfo, extended: dict[str, str], offset: int, size: int
) -> dict[str, str]:
    """Record a file member (``f`` is at its data), or read an extended header; returns the extended fields
    (GNU long name, pax ``path`` and ``size``) that apply to the next member."""
    if info.type == tarfile.GNUTYPE_LONGNAME:
        return {"path": f.read(size).rstrip(b"\0").decode("utf-8", "surrogateescape")}
    if info.type == tarfile.XHDTYPE:
        return pax_fields(f.read(size))
    if info.type in _FILE_TYPES:
        key, ext = split_member(extended.get("path", info.name))
        scan.members.setdefault(key, {})[ext] = (offset, size)
        if ext in _CAPTION_EXTENSIONS and decode_text(f.read(size))[1]:
            scan.not_utf8.add(offset)
    return {}


def pax_fields(data: bytes) -> dict[str, str]:
    """The ``path`` and ``size`` records of a pax extended header; parsing stops at a malformed record."""
    fields, pos = {}, 0
    while pos < len(data):
        length, space, _ = data[pos : pos + 20].partition(b" ")
        if not space or not length.isdigit() or int(length) <= len(length) + 1:
            break
        key, _, value = data[pos + len(length) + 1 : pos + int(length) - 1].partition(b"=")
        fields[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += int(length)
    if not fields.get("size", "0").isdigit():
        fields.pop("size")
    return {k: v for k, v in fields.items() if k in ("path", "size")}


def written_samples(path: Path) -> int | None:
    """How many samples were written to a shard, by its stats file (``NAME_stats.json``, the ``successes``
    of ``lipkit data pack`` and img2dataset); ``None`` when there is no readable one."""
    try:
        return int(json.loads(path.with_name(f"{path.stem}_stats.json").read_text())["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _build_index(scan: TarScan) -> TarIndex:
    keys, image, text, is_json = [], [], [], []
    for key, entries in scan.members.items():
        img = next((entries[e] for e in SHARD_IMAGE_EXTENSIONS if e in entries), None)
        txt = entries.get("txt") if entries.get("txt", (0, 0))[1] > 0 else None
        cap = txt or entries.get("json")
        if img is None or cap is None:
            continue
        keys.append(key.encode("utf-8"))
        image.append(img)
        text.append(cap)
        is_json.append(txt is None)
    return TarIndex(
        np.array(keys, dtype=bytes) if keys else np.zeros(0, "S1"),
        np.array(image, np.int64).reshape(-1, 2),
        np.array(text, np.int64).reshape(-1, 2),
        np.array(is_json, bool),
        incomplete=len(scan.members) - len(keys),
        truncated=scan.truncated,
        damaged=scan.damaged,
        caption_fallbacks=sum(offset in scan.not_utf8 for offset, _ in text),
    )


def cache_dir() -> Path:
    """Where shard indexes are cached: ``$LIPKIT_CACHE_DIR/tar-index`` (default ``~/.cache/lipkit``)."""
    return cache_root() / "tar-index"


def load_index(path: Path | str) -> TarIndex:
    """The index of shard ``path``, from the cache when the shard is unchanged, else built and cached.

    A remote shard (:func:`is_remote`) is indexed by range reads of its headers and cached under its URL,
    with its size and ETag (or modification time); a ``pipe:`` shard is first copied to the cache.

    Raises:
        LipkitError: The shard is missing or unreadable, or not an uncompressed tar.
    """
    if is_remote(path):
        return _load_remote_index(str(path))
    path = Path(path)
    stat = path.stat()
    stamp = np.array([INDEX_VERSION, stat.st_size, stat.st_mtime_ns], np.int64)
    return _cached_index(str(path.resolve()), stamp, lambda: index_tar(path))


def _cached_index(name: str, stamp: np.ndarray, build: Callable[[], TarIndex]) -> TarIndex:
    cached = cache_dir() / (hashlib.sha1(name.encode()).hexdigest()[:24] + ".npz")
    try:
        with np.load(cached, allow_pickle=False) as z:
            if np.array_equal(z["stamp"], stamp):
                counts = dict(zip(_COUNTS + _FLAGS, z["flags"].tolist()))
                counts.update({name: bool(counts[name]) for name in _FLAGS})
                return TarIndex(z["keys"], z["image"], z["text"], z["text_is_json"], **counts)
    except (OSError, KeyError, ValueError):
        pass
    index = build()
    _save_index(cached, index, stamp)
    return index


def pipe_shard(command: str) -> Path:
    """The local copy of the tar that ``pipe:COMMAND`` writes to its standard output (OpenCLIP's form, e.g.
    ``pipe:aws s3 cp s3://bucket/00000.tar -``), made once and kept in the cache (delete it to fetch again).

    Raises:
        LipkitError: The command fails.
    """
    import subprocess

    from lipkit.utils import atomic_write

    local = cache_root() / "pipe" / (hashlib.sha1(command.encode()).hexdigest()[:24] + ".tar")
    if local.is_file():
        return local

    def run(f: BinaryIO) -> None:
        done = subprocess.run(command.removeprefix("pipe:"), shell=True, stdout=f, stderr=subprocess.PIPE)
        if done.returncode:
            reason = done.stderr.decode(errors="replace").strip().splitlines()[-1:] or [f"exit {done.returncode}"]
            raise LipkitError(f"shard command {command!r} failed: {reason[0]}")

    atomic_write(local, run)
    return local


def _load_remote_index(url: str) -> TarIndex:
    if url.startswith("pipe:"):
        return load_index(pipe_shard(url))
    fs, path = _url_to_fs(url)
    try:
        info = fs.info(path)
    except FileNotFoundError:
        raise LipkitError(f"shard not found: {url}") from None
    except Exception as exc:  # each file system raises its own errors for a server that fails
        raise LipkitError(f"cannot read {url}: {type(exc).__name__}: {exc}") from None
    size = int(info.get("size") or 0)
    version = str(next((info[k] for k in ("ETag", "etag", "LastModified", "mtime", "updated") if info.get(k)), ""))
    stamp = np.array([INDEX_VERSION, size, int(hashlib.sha1(version.encode()).hexdigest()[:15], 16)], np.int64)

    def build() -> TarIndex:
        with fs.open(path, "rb", block_size=REMOTE_READ_BLOCK, cache_type="readahead") as f:
            _refuse_compressed(url, f.read(BLOCK))
            scan = scan_tar(f, size)
        return _finish_index(scan, url, lambda: _remote_written_samples(fs, path))

    try:
        return _cached_index(url, stamp, build)
    finally:
        _close_session(fs)


def _remote_written_samples(fs: Any, path: str) -> int | None:
    """A remote shard's ``successes`` by its stats file beside it; ``None`` when there is no readable one."""
    folder, _, name = path.rpartition("/")
    try:
        stats = fs.cat_file(f"{folder}/{name.rsplit('.', 1)[0]}_stats.json")
        return int(json.loads(stats)["successes"])
    except Exception:  # missing, unreadable, or not a stats file: the count is then a lower bound
        return None


def _save_index(cached: Path, index: TarIndex, stamp: np.ndarray) -> None:
    from lipkit.utils import atomic_write

    flags = np.array([getattr(index, name) for name in _COUNTS + _FLAGS], np.int64)
    arrays = {"keys": index.keys, "image": index.image, "text": index.text, "text_is_json": index.text_is_json}
    with contextlib.suppress(OSError, StorageError):  # a read-only cache only costs re-indexing next time
        atomic_write(cached, lambda f: np.savez(f, stamp=stamp, flags=flags, **arrays))


class ShardPairs(PairSource):
    """Image-caption pairs in webdataset tar shards, read at random through per-shard indexes.

    Args:
        shards: The tar files, in order (their order fixes the sample indices).
        name: What the shards came from (a pattern or folder), for messages.

    Attributes:
        skipped: What was lost before training: ``incomplete_samples`` (found without an image or a
            caption), ``corrupt_samples`` (nothing of them could be read, counted from the shards' stats
            files), ``truncated_shards`` and ``corrupt_shards`` (with corrupt headers or garbage).
        caption_fallbacks: Captions that are not UTF-8 (see :func:`lipkit.data.decode.decode_text`).
    """

    def __init__(self, shards: list[Path | str], name: str) -> None:
        self.paths = [str(p) for p in shards]
        # remote shards are read by range requests; a pipe: shard from its copy in the cache
        self.paths = [str(pipe_shard(p)) if p.startswith("pipe:") else p for p in self.paths]
        self.remote = [is_remote(p) for p in self.paths]
        if len(shards) >= 16:  # threads overlap the reads of many (possibly remote) files
            with ThreadPoolExecutor(8) as pool:
                indexes = list(pool.map(load_index, shards))
        else:
            indexes = [load_index(p) for p in shards]
        counts = np.array([len(ix) for ix in indexes], np.int64)
        self.bounds = np.concatenate([[0], np.cumsum(counts)])
        self.shard_of = np.repeat(np.arange(len(shards), dtype=np.int32), counts)
        self.keys = np.concatenate([ix.keys for ix in indexes]) if indexes else np.zeros(0, "S1")
        self.image_loc = np.concatenate([ix.image for ix in indexes])
        self.text_loc = np.concatenate([ix.text for ix in indexes])
        self.text_is_json = np.concatenate([ix.text_is_json for ix in indexes])
        self.skipped = {
            "incomplete_samples": sum(ix.incomplete for ix in indexes),
            "corrupt_samples": sum(ix.corrupt for ix in indexes),
            "truncated_shards": sum(ix.truncated for ix in indexes),
            "corrupt_shards": sum(ix.damaged > 0 for ix in indexes),
        }
        self.caption_fallbacks = sum(ix.caption_fallbacks for ix in indexes)
        self._warn(name, indexes)
        if not len(self.keys):
            raise LipkitError(f"{name}: the shards hold no complete image-caption samples")
        self._fds: dict[int, int] = {}
        self._fs: dict[str, Any] = {}
        self._caption_read: tuple[int, bytes] | None = None  # a caption read with its image (remote)
        self._prefetched: dict[int, bytes] = {}  # index -> its image and caption span, fetched ahead (remote)
        self._pid = os.getpid()

    def _warn(self, name: str, indexes: list[TarIndex]) -> None:
        truncated = [p for p, ix in zip(self.paths, indexes) if ix.truncated]
        corrupt = [p for p, ix in zip(self.paths, indexes) if ix.damaged]
        uncounted = sum(ix.uncounted for ix in indexes)
        found = []
        if truncated:
            found.append(f"{len(truncated)} truncated shard(s), e.g. {truncated[0]}")
        if corrupt:
            found.append(f"{len(corrupt)} shard(s) with corrupt tar headers, read past them, e.g. {corrupt[0]}")
        if self.skipped["incomplete_samples"]:
            found.append(f"skipped {self.skipped['incomplete_samples']} samples without an image or a caption")
        if self.skipped["corrupt_samples"]:
            found.append(f"lost {self.skipped['corrupt_samples']} samples of which nothing could be read")
        if uncounted:
            found.append(
                f"{uncounted} damaged shard(s) have no stats file: of the samples they lost whole, only those named "
                "by a legible corrupt header are counted"
            )
        if found:
            warnings.warn(f"{name}: {'; '.join(found)}", stacklevel=3)
        warn_caption_fallbacks(name, self.caption_fallbacks, stacklevel=4)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        # file descriptors and file systems (their connections) stay with the process that opened them
        return {**self.__dict__, "_fds": {}, "_fs": {}, "_caption_read": None, "_prefetched": {}}

    def __del__(self) -> None:
        if getattr(self, "_pid", None) == os.getpid():
            for fd in self._fds.values():
                with contextlib.suppress(OSError):
                    os.close(fd)

    def groups(self) -> np.ndarray:
        return self.bounds

    def key(self, index: int) -> str:
        return self.keys[index].decode("utf-8")

    def caption(self, index: int) -> str:
        early, ahead = self._caption_read, self._prefetched.get(index)
        if early is not None and early[0] == index:
            data = early[1]
        elif ahead is not None:  # fetched with its image: cut the caption out of the span
            at, size = self.text_loc[index].tolist()
            data = ahead[at - self._span(index)[0] :][:size]
        else:
            data = self._read(index, self.text_loc[index], UnreadableCaption)
        text, _ = decode_text(data)
        if self.text_is_json[index]:
            try:
                text = str(json.loads(text).get("caption") or "")
            except (ValueError, AttributeError) as exc:
                raise UnreadableCaption(f"{self.key(index)}: {exc}") from None
        return text.strip()

    def image(self, index: int, draft: tuple[int, int] | None = None) -> Image.Image:
        if not self.remote[int(self.shard_of[index])]:
            return open_image(self._read(index, self.image_loc[index], UndecodableImage), draft)
        # one range request for the image and the caption (neighbours in the tar), the caption kept for caption()
        (img_at, img_size), (txt_at, txt_size) = self.image_loc[index].tolist(), self.text_loc[index].tolist()
        start, size = self._span(index)
        span = self._prefetched.pop(index, None)
        if span is None:
            span = self._read(index, np.array([start, size]), UndecodableImage)
        self._caption_read = (index, span[txt_at - start : txt_at - start + txt_size])
        return open_image(span[img_at - start : img_at - start + img_size], draft)

    def _span(self, index: int) -> tuple[int, int]:
        """Offset and size of the bytes that hold both the image and the caption of ``index``."""
        (img_at, img_size), (txt_at, txt_size) = self.image_loc[index].tolist(), self.text_loc[index].tolist()
        start = min(img_at, txt_at)
        return start, max(img_at + img_size, txt_at + txt_size) - start

    def prefetch(self, indexes: Sequence[int]) -> None:
        """Fetch the remote pairs among ``indexes`` concurrently (fsspec ``cat_ranges``: one request each, all
        in flight at once), so a batch costs about one round trip instead of one per sample. Only the last
        call's pairs are held; a range that fails is read again, and raises, when its pair is read."""
        by_protocol: dict[str, list[int]] = {}
        for index in dict.fromkeys(int(i) for i in indexes):
            shard = int(self.shard_of[index])
            if self.remote[shard]:
                by_protocol.setdefault(self.paths[shard].split("://", 1)[0], []).append(index)
        self._prefetched = {}
        for group in by_protocol.values():
            fs, _ = self._remote_fs(int(self.shard_of[group[0]]))
            paths = [fs._strip_protocol(self.paths[int(self.shard_of[i])]) for i in group]
            spans = [self._span(i) for i in group]
            try:
                data = fs.cat_ranges(paths, [s for s, _ in spans], [s + n for s, n in spans], on_error="return")
            except Exception:  # the reads themselves say what is wrong, one sample at a time
                continue
            for index, (_, size), got in zip(group, spans, data):
                if isinstance(got, bytes) and len(got) == size:
                    self._prefetched[index] = got

    def _read(self, index: int, loc: np.ndarray, error: type[Exception]) -> bytes:
        offset, size = int(loc[0]), int(loc[1])
        shard = int(self.shard_of[index])
        try:
            if self.remote[shard]:
                fs, path = self._remote_fs(shard)
                data = fs.cat_file(path, start=offset, end=offset + size)
            else:
                data = os.pread(self._fd(shard), size, offset)
        except OSError as exc:
            if not self.remote[shard]:
                raise error(f"{self.key(index)}: {exc}") from None
            raise error(f"{self.key(index)}: {type(exc).__name__}: {exc}") from None  # e.g. FileNotFoundError: URL
        except Exception as exc:  # a remote file system's own errors (a server that fails, a lost connection)
            raise error(f"{self.key(index)}: {type(exc).__name__}: {exc}") from None
        if len(data) != size:
            raise error(f"{self.key(index)}: the shard ends early")
        return data

    def _remote_fs(self, shard: int) -> tuple[Any, str]:
        """This process's own file system for a remote shard (connections are not shared across a fork)."""
        if self._pid != os.getpid():
            self._fds, self._fs, self._prefetched, self._pid = {}, {}, {}, os.getpid()
        url = self.paths[shard]
        protocol = url.split("://", 1)[0]
        if protocol not in self._fs:
            self._fs[protocol] = _url_to_fs(url)[0]
        fs = self._fs[protocol]
        return fs, fs._strip_protocol(url)

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are shared, open our own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_FILES:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

"""Webdataset tar shards read at random: each tar is indexed once, then samples are read by offset.

A shard is an uncompressed tar in webdataset's layout: consecutive members sharing a key (the path up to
the first dot of the file name) form one sample, e.g. ``000000042.jpg``, ``000000042.txt``,
``000000042.json``. :func:`index_tar` records where each sample's image and caption lie; the index is
cached (``$LIPKIT_CACHE_DIR/tar-index``, default ``~/.cache/lipkit``), keyed by the shard's path, size
and modification time, so it is rebuilt only when the shard changes. With the index, a list of shards
becomes a map-style source and the loader can use the same deterministic step -> batch sampler as any
other source, which gives exact resume.

A truncated shard keeps its complete samples; the lost ones are counted and reported once.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lipkit.data.decode import SHARD_IMAGE_EXTENSIONS, UndecodableImage, UnreadableCaption, open_image
from lipkit.data.pairs import PairSource
from lipkit.errors import LipkitError
from lipkit.utils import cache_root

INDEX_VERSION = 1
MAX_OPEN_FILES = 64
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


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


def resolve_shards(pattern: str) -> list[Path]:
    """The tar files named by a brace pattern and/or glob, in pattern order.

    Raises:
        LipkitError: Nothing matches the pattern, or some of the files it names explicitly are missing.
    """
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


@dataclass
class TarIndex:
    """Where the samples of one shard lie.

    Attributes:
        keys: Sample keys, UTF-8 bytes (a compact array).
        image: (N, 2) offsets and sizes of the image members.
        text: (N, 2) offsets and sizes of the caption members.
        text_is_json: (N,) whether the caption is the ``caption`` field of a ``.json`` member.
        incomplete: Samples dropped for lacking an image or a caption (truncation included).
        truncated: The tar ends early (its end-of-archive blocks are missing).
    """

    keys: np.ndarray
    image: np.ndarray
    text: np.ndarray
    text_is_json: np.ndarray
    incomplete: int = 0
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.keys)


def split_member(name: str) -> tuple[str, str]:
    """Webdataset's key and extension of a member name: ``a/b.seg.png`` -> (``a/b``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_tar(path: Path) -> TarIndex:
    """Scan a tar's headers (not its data) and record every complete sample.

    Raises:
        LipkitError: The file is not an uncompressed tar.
    """
    size = path.stat().st_size
    members: dict[str, dict[str, tuple[int, int]]] = {}
    truncated = False
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if m.isfile():
                    if m.offset_data + m.size > size:
                        truncated = True
                        break
                    key, ext = split_member(m.name)
                    members.setdefault(key, {})[ext] = (m.offset_data, m.size)
            truncated = truncated or not _has_end_blocks(path, tar.offset, size)
    except tarfile.ReadError as exc:
        if not members:
            raise LipkitError(
                f"{path} is not an uncompressed tar ({exc}); compressed shards cannot be read at random, "
                "decompress them first"
            ) from None
        truncated = True
    return _build_index(members, truncated)


def _has_end_blocks(path: Path, offset: int, size: int) -> bool:
    with open(path, "rb") as f:
        f.seek(offset)
        end = f.read(1024)
    return len(end) == 1024 and not any(end) and offset + 1024 <= size


def _build_index(members: dict[str, dict[str, tuple[int, int]]], truncated: bool) -> TarIndex:
    keys, image, text, is_json = [], [], [], []
    for key, entries in members.items():
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
        incomplete=len(members) - len(keys),
        truncated=truncated,
    )


def cache_dir() -> Path:
    """Where shard indexes are cached: ``$LIPKIT_CACHE_DIR/tar-index`` (default ``~/.cache/lipkit``)."""
    return cache_root() / "tar-index"


def load_index(path: Path) -> TarIndex:
    """The index of shard ``path``, from the cache when the shard is unchanged, else built and cached."""
    stat = path.stat()
    stamp = np.array([INDEX_VERSION, stat.st_size, stat.st_mtime_ns], np.int64)
    cached = cache_dir() / (hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:24] + ".npz")
    try:
        with np.load(cached, allow_pickle=False) as z:
            if np.array_equal(z["stamp"], stamp):
                flags = z["flags"]
                return TarIndex(z["keys"], z["image"], z["text"], z["text_is_json"], int(flags[0]), bool(flags[1]))
    except (OSError, KeyError, ValueError):
        pass
    index = index_tar(path)
    _save_index(cached, index, stamp)
    return index


def _save_index(cached: Path, index: TarIndex, stamp: np.ndarray) -> None:
    from lipkit.utils import atomic_write

    flags = np.array([index.incomplete, index.truncated], np.int64)
    arrays = {"keys": index.keys, "image": index.image, "text": index.text, "text_is_json": index.text_is_json}
    with contextlib.suppress(OSError):  # a read-only cache only costs re-indexing next time
        atomic_write(cached, lambda f: np.savez(f, stamp=stamp, flags=flags, **arrays))


class ShardPairs(PairSource):
    """Image-caption pairs in webdataset tar shards, read at random through per-shard indexes.

    Args:
        shards: The tar files, in order (their order fixes the sample indices).
        name: What the shards came from (a pattern or folder), for messages.

    Attributes:
        skipped: Samples lost before training: ``incomplete_samples`` (no image or caption, including
            those cut off by truncation) and ``truncated_shards``.
    """

    def __init__(self, shards: list[Path], name: str) -> None:
        self.paths = [str(p) for p in shards]
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
            "truncated_shards": sum(ix.truncated for ix in indexes),
        }
        self._warn(name, [p for p, ix in zip(self.paths, indexes) if ix.truncated])
        if not len(self.keys):
            raise LipkitError(f"{name}: the shards hold no complete image-caption samples")
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def _warn(self, name: str, truncated: list[str]) -> None:
        if truncated:
            warnings.warn(f"{name}: {len(truncated)} truncated shard(s), e.g. {truncated[0]}", stacklevel=3)
        if self.skipped["incomplete_samples"]:
            n = self.skipped["incomplete_samples"]
            warnings.warn(f"{name}: skipped {n} samples without an image or a caption", stacklevel=3)

    def __len__(self) -> int:
        return len(self.keys)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}  # file descriptors stay with the process that opened them

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
        data = self._read(index, self.text_loc[index], UnreadableCaption)
        try:
            text = data.decode("utf-8")
            if self.text_is_json[index]:
                text = str(json.loads(text).get("caption") or "")
        except (UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise UnreadableCaption(f"{self.key(index)}: {exc}") from None
        return text.strip()

    def image(self, index: int, draft: tuple[int, int] | None = None) -> Image.Image:
        return open_image(self._read(index, self.image_loc[index], UndecodableImage), draft)

    def _read(self, index: int, loc: np.ndarray, error: type[Exception]) -> bytes:
        offset, size = int(loc[0]), int(loc[1])
        try:
            data = os.pread(self._fd(int(self.shard_of[index])), size, offset)
        except OSError as exc:
            raise error(f"{self.key(index)}: {exc}") from None
        if len(data) != size:
            raise error(f"{self.key(index)}: the shard ends early")
        return data

    def _fd(self, shard: int) -> int:
        if self._pid != os.getpid():  # forked: the parent's descriptors are shared, open our own
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(shard)
        if fd is None:
            if len(self._fds) >= MAX_OPEN_FILES:
                os.close(self._fds.pop(next(iter(self._fds))))
            fd = self._fds[shard] = os.open(self.paths[shard], os.O_RDONLY)
        return fd

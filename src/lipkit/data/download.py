"""Download a table of image URLs and captions into webdataset shards, in img2dataset's layout.

Output folder (what ``lipkit data pack`` writes, plus one status table per shard)::

    00000.tar            000000000.jpg  000000000.txt  000000000.json ...
    00000.parquet        one row per URL of the shard: key, url, caption, status, error, HTTP status, sizes, sha256
    00000_stats.json     counts: successes, failures by kind, bytes fetched, settings
    00001.tar ...

Row ``i`` of the table goes to shard ``i // samples_per_shard`` under img2dataset's key (shard number, then
position). Each shard is one task: a process fetches its URLs on a pool of threads (at most ``per_host``
connections to one host), with a deadline per response, retries with backoff for timeouts, connection errors
and 5xx/429 answers, and ``X-Robots-Tag`` opt-outs honoured (``noai``, ``noimageai``, ``noindex``,
``noimageindex``, for every agent or for lipkit's). Images are checked (declared size against
``max_pixels``, decodable) and shrunk as ``lipkit data pack`` shrinks them.

Every URL ends with one status: ``success``, ``timeout``, ``http_<code>``, ``connection_error``,
``too_large``, ``not_an_image``, ``truncated``, ``decompression_bomb``, ``opted_out``, ``missing_caption``
or ``bad_url``. Nothing is fatal to the job.

Resuming: the tar, its Parquet table and its stats are written atomically, the stats last; a shard with
its stats is finished and skipped by a re-run. Fetched bytes are spooled to ``.fetched/NNNNN`` while a shard
is in progress, keyed by the URL's hash, so a shard cut short does not fetch again what it already has; a
URL listed twice in a shard is fetched once. Shards run in local processes, or on a Ray cluster (Ray Data),
with the same output.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import shutil
import struct
import tarfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

from lipkit.data.decode import DECODE_ERRORS, BadSample, UndecodableImage, open_for_max_side
from lipkit.data.files import CAPTION_COLUMNS, cell_text, pick_column, read_columns
from lipkit.data.pack import (
    Decoded,
    Item,
    PackOptions,
    add_member,
    check_existing,
    encode_item,
    sample_key,
    shard_name,
    stats_path,
)
from lipkit.errors import LipkitError
from lipkit.utils import FolderLock, atomic_write, atomic_write_text, strict_json

URL_COLUMNS = ("url", "image_url", "img_url", "link", "image_link")
OPT_OUT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")
USER_AGENT_TOKEN = "lipkit"
RETRIED = {"timeout", "connection_error", "http_429", "http_500", "http_502", "http_503", "http_504"}
STATUS_COLUMNS = (
    "key", "url", "caption", "status", "error", "http_status", "width", "height", "original_width",
    "original_height", "bytes", "sha256",
)  # fmt: skip


@dataclass(frozen=True)
class UrlRow:
    """One row of the table: the URL, its caption and any other columns (kept in the sample's JSON)."""

    url: str
    caption: str | None
    meta: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True)
class DownloadOptions:
    """How to download.

    Attributes:
        samples_per_shard: Table rows per shard.
        max_side: Shrink images so that their longer side is at most this (``None``: keep their size).
        quality: JPEG / WebP quality of re-encoded images.
        image_format: ``jpg``, ``png`` or ``webp``.
        processes: Shards fetched at once, each in its own process.
        threads: Concurrent requests per process.
        per_host: Connections per host, at most, in each process.
        timeout: Seconds for a whole response (connecting, headers and body).
        retries: Further tries after a timeout, a connection error or a 5xx/429 answer.
        backoff: Seconds before the first retry, doubled at each next one.
        max_bytes: Larger bodies are dropped as ``too_large``.
        max_pixels: Images declaring more pixels are dropped as ``decompression_bomb``, before decoding.
        respect_opt_out: Skip URLs whose ``X-Robots-Tag`` opts out of AI use (``opted_out``).
        user_agent: The ``User-Agent`` header sent.
    """

    samples_per_shard: int = 10_000
    max_side: int | None = None
    quality: int = 95
    image_format: str = "jpg"
    processes: int = 1
    threads: int = 32
    per_host: int = 8
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5
    max_bytes: int = 20_000_000
    max_pixels: int = 89_478_485  # PIL's own warning threshold
    respect_opt_out: bool = True
    user_agent: str = "lipkit-download/1 (+https://github.com/lipkit/lipkit)"

    def validate(self) -> None:
        """Check the options.

        Raises:
            LipkitError: A value is out of range.
        """
        self.pack_options().validate()
        for name in ("processes", "threads", "per_host", "max_bytes", "max_pixels"):
            if getattr(self, name) < 1:
                raise LipkitError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.timeout <= 0 or self.retries < 0 or self.backoff < 0:
            raise LipkitError("timeout must be positive, retries and backoff at least 0")

    def pack_options(self) -> PackOptions:
        """The image settings, as ``lipkit data pack`` takes them."""
        return PackOptions(self.samples_per_shard, self.max_side, self.quality, self.image_format)


@dataclass
class DownloadResult:
    """What :func:`download` did.

    Attributes:
        out: The output folder.
        shards: Shards of the table.
        written: Shards written by this run (the others were already finished).
        count: URLs in the table.
        successes: Samples written.
        failures: URLs without a sample, by kind.
        seconds: Time this run took.
    """

    out: Path
    shards: int
    written: int
    count: int
    successes: int
    failures: dict[str, int]
    seconds: float


def read_url_table(path: str | Path, url_col: str | None = None, caption_col: str | None = None) -> list[UrlRow]:
    """The rows of a URL table: Parquet, CSV or TSV with a header (LAION's ``URL``/``TEXT``, DataComp's
    ``url``/``text``...), or CC3M's TSV without one (caption, then URL), found by its first row holding a URL.

    Raises:
        LipkitError: The table is missing or unreadable, or lacks a URL or caption column.
    """
    path = Path(path)
    columns = read_columns(path)
    headerless = [name for name in columns if name.startswith(("http://", "https://"))]
    if headerless and url_col is None and len(columns) >= 2:
        columns = _headerless(path, headerless[0])
    url_col = pick_column(path, columns, url_col, URL_COLUMNS, "url")
    caption_col = pick_column(path, columns, caption_col, CAPTION_COLUMNS, "caption")
    rows = []
    for i, url in enumerate(columns[url_col]):
        caption = cell_text(columns[caption_col][i])[0].strip() or None
        meta = {name: _plain(values[i]) for name, values in columns.items() if name not in (url_col, caption_col)}
        rows.append(UrlRow(cell_text(url)[0].strip(), caption, meta))
    if not rows:
        raise LipkitError(f"table {path} has no rows")
    return rows


def _headerless(path: Path, url_header: str) -> dict[str, list]:
    """A table whose first row is data: the column holding URLs is ``url``, the other ``caption`` (CC3M)."""
    import csv

    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with open(path, newline="", encoding="latin-1") as f:
        rows = [r for r in csv.reader(f, delimiter=delimiter) if r]
    first = rows[0]
    url_index = first.index(url_header)
    caption_index = next(i for i in range(len(first)) if i != url_index)
    names = [{url_index: "url", caption_index: "caption"}.get(i, f"column{i}") for i in range(len(first))]
    return {name: [r[i].encode("latin-1") if i < len(r) else None for r in rows] for i, name in enumerate(names)}


def _plain(value: Any) -> Any:
    """A table cell as JSON can hold it."""
    if isinstance(value, bytes):
        return cell_text(value)[0]
    return value if isinstance(value, (str, int, float, bool)) or value is None else str(value)


@dataclass(frozen=True)
class ShardJob:
    """One shard to download: its number, the position of its first row, its rows, where and how."""

    shard: int
    first: int
    rows: list[UrlRow]
    out: Path
    options: DownloadOptions
    settings: dict[str, Any]


def download(
    rows: Sequence[UrlRow],
    out: str | Path,
    options: DownloadOptions,
    progress: bool = True,
    ray_address: str | None = None,
) -> DownloadResult:
    """Download ``rows`` into shards in ``out``, skipping the shards a previous run finished.

    Args:
        rows: The table (:func:`read_url_table`).
        out: The output folder; locked while the job runs.
        options: How to download.
        progress: Show a progress bar (images/s and the success rate).
        ray_address: Run the shards on a Ray cluster through Ray Data (``local`` starts one here); the output
            folder must be shared with its nodes.

    Raises:
        LipkitError: Bad options, no rows, or ``out`` holds shards of another table or other settings.
        FolderInUseError: Another job is writing into ``out``.
    """
    options.validate()
    if not rows:
        raise LipkitError("nothing to download: the table has no rows")
    out = Path(out)
    start = time.perf_counter()
    with FolderLock(out, "downloading shards"):
        for stale in out.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        settings = _settings(rows, options)
        check_existing(out, settings, "downloaded from another table or with other settings", "download")
        n = options.samples_per_shard
        jobs = [ShardJob(i // n, i, list(rows[i : i + n]), out, options, settings) for i in range(0, len(rows), n)]
        todo = [job for job in jobs if not stats_path(out, job.shard).is_file()]
        done = sum(len(j.rows) for j in jobs) - sum(len(j.rows) for j in todo)
        bar = _Progress(len(rows), done, f"downloading into {out}", progress)
        try:
            if ray_address is not None:
                _run_ray(todo, ray_address, bar)
            else:
                _run_local(todo, options.processes, bar)
        finally:
            bar.close()
        shutil.rmtree(out / ".fetched", ignore_errors=True)
        return _summarise(out, jobs, len(todo), time.perf_counter() - start)


def _settings(rows: Sequence[UrlRow], options: DownloadOptions) -> dict[str, Any]:
    """What must match for a re-run to reuse finished shards: the image settings and the list of URLs."""
    digest = hashlib.sha1("\n".join(f"{r.url}\t{r.caption}" for r in rows).encode("utf-8")).hexdigest()
    kept = {k: asdict(options)[k] for k in ("samples_per_shard", "max_side", "quality", "image_format")}
    return {**kept, "rows": len(rows), "rows_sha1": digest}


class _Progress:
    """A progress bar of URLs done, with images/s and the success rate."""

    def __init__(self, total: int, done: int, desc: str, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=done, unit="url", desc=desc, disable=not enabled)
        self.ok = self.seen = 0
        self.start = time.perf_counter()

    def update(self, count: int, ok: int) -> None:
        self.seen += count
        self.ok += ok
        self.bar.update(count)
        rate = self.ok / max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix(images_s=f"{rate:.1f}", success=f"{self.ok / max(self.seen, 1):.1%}")

    def close(self) -> None:
        self.bar.close()


_QUEUE: Any = None  # the progress queue of a worker process


def _init_worker(queue: Any) -> None:
    global _QUEUE
    _QUEUE = queue


def _run_local(jobs: list[ShardJob], processes: int, bar: _Progress) -> None:
    if processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            download_shard(job, bar.update)
        return
    ctx = multiprocessing.get_context()
    queue = ctx.Queue()
    with ctx.Pool(min(processes, len(jobs)), initializer=_init_worker, initargs=(queue,)) as pool:
        pending = pool.map_async(_pool_shard, jobs, chunksize=1)
        while True:
            _drain(queue, bar)
            if pending.ready():
                break
            pending.wait(0.2)
        _drain(queue, bar)
        pending.get()  # re-raises a worker's error


def _drain(queue: Any, bar: _Progress) -> None:
    import queue as queue_module

    while True:
        try:
            bar.update(*queue.get_nowait())
        except queue_module.Empty:
            return


def _pool_shard(job: ShardJob) -> dict[str, Any]:
    return download_shard(job, lambda count, ok: _QUEUE.put((count, ok)))


def _run_ray(jobs: list[ShardJob], address: str, bar: _Progress) -> None:
    if not jobs:
        return
    import ray

    from lipkit.ray_cluster import connect

    started = connect(address)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        dataset = ray.data.from_items([{"job": job} for job in jobs], override_num_blocks=len(jobs))
        stats = dataset.map(_ray_shard).iter_rows()
        for row in stats:
            bar.update(row["count"], row["successes"])
    finally:
        if started:
            ray.shutdown()


def _ray_shard(row: dict[str, Any]) -> dict[str, Any]:
    stats = download_shard(row["job"])
    return {"count": stats["count"], "successes": stats["successes"]}


class _Fetcher:
    """HTTP(S) fetching for one process: pooled keep-alive connections, at most ``per_host`` to a host."""

    def __init__(self, options: DownloadOptions) -> None:
        import urllib3

        self.options = options
        self.pool = urllib3.PoolManager(
            num_pools=256, maxsize=options.per_host, block=True, headers={"User-Agent": options.user_agent}
        )

    def fetch(self, url: str) -> tuple[str, bytes | None, int | None, str]:
        """``(status, body, http_status, error)`` for ``url``, retried as the options say."""
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
            return "bad_url", None, None, f"not an http(s) URL: {url[:80]}"
        for attempt in range(self.options.retries + 1):
            status, body, code, error = self._once(url)
            if status not in RETRIED or attempt == self.options.retries:
                return status, body, code, error
            time.sleep(self.options.backoff * 2**attempt)
        raise AssertionError("unreachable")

    def _once(self, url: str) -> tuple[str, bytes | None, int | None, str]:
        import urllib3

        o = self.options
        deadline = time.monotonic() + o.timeout
        try:
            response = self.pool.request(
                "GET",
                url,
                preload_content=False,
                retries=False,
                timeout=urllib3.Timeout(connect=o.timeout, read=o.timeout),
            )
        except urllib3.exceptions.NewConnectionError as exc:  # refused, unreachable (urllib3 files it as a timeout)
            return "connection_error", None, None, f"{type(exc).__name__}: {str(exc)[:200]}"
        except urllib3.exceptions.TimeoutError as exc:
            return "timeout", None, None, str(exc)[:200]
        except urllib3.exceptions.HTTPError as exc:
            return "connection_error", None, None, f"{type(exc).__name__}: {str(exc)[:200]}"
        complete = False
        try:
            code = response.status
            if code >= 400:
                return f"http_{code}", None, code, f"HTTP {code}"
            if o.respect_opt_out and opted_out(response.headers.getlist("X-Robots-Tag")):
                return "opted_out", None, code, f"X-Robots-Tag: {', '.join(response.headers.getlist('X-Robots-Tag'))}"
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > o.max_bytes:
                return "too_large", None, code, f"{declared} bytes declared, more than {o.max_bytes}"
            chunks, size = [], 0
            while chunk := response.read1(64 * 1024):  # what has arrived: a trickling body meets the deadline
                chunks.append(chunk)
                size += len(chunk)
                if size > o.max_bytes:
                    return "too_large", None, code, f"more than {o.max_bytes} bytes"
                if time.monotonic() > deadline:
                    return "timeout", None, code, f"the response took more than {o.timeout} s"
            complete = True
            if time.monotonic() > deadline:
                return "timeout", None, code, f"the response took more than {o.timeout} s"
            return "success", b"".join(chunks), code, ""
        except urllib3.exceptions.TimeoutError as exc:
            return "timeout", None, None, str(exc)[:200]
        except urllib3.exceptions.ProtocolError as exc:  # the body ended before its declared length
            return "truncated", None, None, f"{type(exc).__name__}: {str(exc)[:200]}"
        except urllib3.exceptions.HTTPError as exc:
            return "connection_error", None, None, f"{type(exc).__name__}: {str(exc)[:200]}"
        finally:
            if not complete:  # a body left unread must not reach the next request on this connection
                response.close()
            response.release_conn()


def opted_out(values: Sequence[str], token: str = USER_AGENT_TOKEN) -> bool:
    """Whether ``X-Robots-Tag`` header values opt out of AI use for every agent or for ``token``.

    A value is a comma-separated list of directives, optionally after ``AGENT:`` (``otherbot: noai`` does not
    apply to lipkit; ``noai`` and ``lipkit: noimageai`` do).
    """
    for value in values:
        agent, sep, rest = value.partition(":")
        if sep and agent.strip().lower() not in OPT_OUT_DIRECTIVES and " " not in agent.strip():
            if agent.strip().lower() != token:
                continue
            value = rest
        if any(d.strip().lower() in OPT_OUT_DIRECTIVES for d in value.split(",")):
            return True
    return False


class _Spool:
    """Fetched results of one shard, appended to one file while the shard is in progress (``.fetched/NNNNN``).

    Each record is the URL's SHA-256, a JSON header (status, HTTP status, error, body length) and the
    body, written unbuffered (a killed process loses none) but not synced: after a crash the records read
    back are those written whole, and a torn last record is ignored (its URL is fetched again).
    """

    def __init__(self, out: Path, shard: int) -> None:
        self.path = out / ".fetched" / shard_name(shard)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.found = self._read()
        self.lock = threading.Lock()
        self.file = open(self.path, "ab", buffering=0)  # noqa: SIM115 (closed by remove); a kill loses no record

    def _read(self) -> dict[bytes, tuple[str, bytes | None, int | None, str]]:
        found: dict[bytes, tuple[str, bytes | None, int | None, str]] = {}
        try:
            data = self.path.read_bytes()
        except OSError:
            return found
        at = 0
        while at + 36 <= len(data):
            digest, (size,) = data[at : at + 32], struct.unpack(">I", data[at + 32 : at + 36])
            try:
                meta = json.loads(data[at + 36 : at + 36 + size])
            except ValueError:
                break
            body_at = at + 36 + size
            body = data[body_at : body_at + meta["bytes"]]
            if len(body) != meta["bytes"]:
                break
            found[digest] = (meta["status"], body if meta["status"] == "success" else None, meta["http"], meta["error"])
            at = body_at + meta["bytes"]
        return found

    @staticmethod
    def _digest(url: str) -> bytes:
        return hashlib.sha256(url.encode("utf-8")).digest()

    def get(self, url: str) -> tuple[str, bytes | None, int | None, str] | None:
        return self.found.get(self._digest(url))

    def put(self, url: str, result: tuple[str, bytes | None, int | None, str]) -> None:
        status, body, code, error = result
        if status in RETRIED:  # a passing fault: a re-run tries again
            return
        body = body or b""
        meta = json.dumps({"status": status, "http": code, "error": error, "bytes": len(body)}).encode("utf-8")
        record = self._digest(url) + struct.pack(">I", len(meta)) + meta + body
        with self.lock:
            self.file.write(record)

    def remove(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class _Fetched:
    """An image already fetched, for :func:`lipkit.data.pack.encode_item`."""

    data: bytes
    max_pixels: int

    def load(self, max_side: int | None) -> Decoded:
        try:
            with Image.open(io.BytesIO(self.data)) as probe:
                width, height = probe.size
        except Image.DecompressionBombError as exc:
            raise _Bomb(str(exc)) from None
        except DECODE_ERRORS:  # not an image at all: decoding below says why
            width = height = 0
        if width * height > self.max_pixels:
            raise _Bomb(f"{width} x {height} pixels, more than {self.max_pixels}")
        if max_side is None or max(width, height) <= max_side:
            kept = _kept_jpeg(self.data)
            if kept is not None:
                return kept
        img, original = open_for_max_side(self.data, max_side)
        plain = img.format == "JPEG" and img.size == original and img.mode in ("RGB", "L")
        return Decoded(img, original, self.data if plain else None)


def _kept_jpeg(data: bytes) -> Decoded | None:
    """A JPEG that will be kept as it is, checked by decoding it at 1/8 scale (the whole stream is still read,
    so a truncated or corrupt one fails); ``None`` when it is not such a JPEG."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        size = img.size
        img.draft(img.mode, (max(1, size[0] // 8), max(1, size[1] // 8)))
        img.load()
    except DECODE_ERRORS as exc:
        raise UndecodableImage(f"{type(exc).__name__}: {exc}") from None
    return Decoded(Image.open(io.BytesIO(data)), size, data)  # not decoded: its bytes are written as they are


class _Bomb(BadSample):
    reason = "decompression_bomb"


def download_shard(job: ShardJob, report: Any = None) -> dict[str, Any]:
    """Fetch one shard's URLs and write its tar, status table and stats (each atomically, the stats last).

    Args:
        job: The shard.
        report: Called as ``report(count, successes)`` as URLs finish (for a progress bar).

    Returns:
        The shard's stats.
    """
    start = time.perf_counter()
    options, spool = job.options, _Spool(job.out, job.shard)
    fetcher = _Fetcher(options)
    unique = list(dict.fromkeys(row.url for row in job.rows))  # in the order the rows first need them
    order = {url: i for i, url in enumerate(unique)}
    uses = Counter(row.url for row in job.rows)
    # URLs fetched ahead of the writer, which writes in table order (the same shards however they are fetched):
    # wide enough that one slow URL does not idle the threads, and a bound on the bodies held in memory
    window = max(256, 16 * options.threads)
    lock = threading.Lock()
    fetched: dict[str, tuple[str, bytes | None, int | None, str]] = {}

    def fetch(url: str) -> None:
        result = spool.get(url)
        if result is None:
            result = fetcher.fetch(url)
            spool.put(url, result)
        with lock:
            fetched[url] = result

    statuses: list[dict[str, Any]] = []
    failures: Counter[str] = Counter()
    fetched_bytes = 0

    def fill(f: io.BufferedWriter) -> None:
        nonlocal fetched_bytes
        with (
            ThreadPoolExecutor(options.threads) as pool,
            tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar,
        ):
            futures: dict[str, Any] = {}
            for position, row in enumerate(job.rows):
                while len(futures) < len(unique) and len(futures) <= order[row.url] + window:
                    url = unique[len(futures)]
                    futures[url] = pool.submit(fetch, url)
                futures[row.url].result()
                key = sample_key(job.shard, position, options.samples_per_shard)
                with lock:
                    result = fetched[row.url]
                    uses[row.url] -= 1
                    if not uses[row.url]:
                        del fetched[row.url]
                record = _sample(row, key, result, options, tar)
                statuses.append(record)
                fetched_bytes += record["bytes"] or 0
                if record["status"] != "success":
                    failures[record["status"]] += 1
                if report is not None:
                    report(1, int(record["status"] == "success"))

    tar_path = job.out / f"{shard_name(job.shard)}.tar"
    atomic_write(tar_path, fill)
    tar_path.chmod(0o644)
    _write_status_table(job.out / f"{shard_name(job.shard)}.parquet", statuses)
    stats = {
        "shard": shard_name(job.shard),
        "first_item": job.first,
        "count": len(job.rows),
        "successes": len(job.rows) - sum(failures.values()),
        "failures": dict(sorted(failures.items())),
        "bytes_fetched": fetched_bytes,
        "tar_bytes": tar_path.stat().st_size,
        "seconds": round(time.perf_counter() - start, 3),
        "settings": job.settings,
    }
    atomic_write_text(stats_path(job.out, job.shard), strict_json(stats, indent=1) + "\n")
    stats_path(job.out, job.shard).chmod(0o644)
    spool.remove()
    return stats


def _sample(
    row: UrlRow,
    key: str,
    result: tuple[str, bytes | None, int | None, str],
    options: DownloadOptions,
    tar: tarfile.TarFile,
) -> dict[str, Any]:
    """Write one fetched URL's sample into ``tar`` if it is good; its status row either way."""
    status, body, code, error = result
    record: dict[str, Any] = dict.fromkeys(STATUS_COLUMNS)
    record.update(key=key, url=row.url, caption=row.caption, status=status, error=error or None, http_status=code)
    if body is None:
        return record
    record.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    item = Item(row.url, row.caption, _Fetched(body, options.max_pixels), {"url": row.url, **row.meta})
    try:
        files, size = encode_item(item, key, options.pack_options())
    except UndecodableImage as exc:
        kind = "truncated" if "truncated" in str(exc) else "not_an_image"
        record.update(status=kind, error=str(exc)[:300])
        return record
    except BadSample as exc:
        record.update(status=exc.reason, error=str(exc)[:300] or exc.reason)
        return record
    for name, data in files.items():
        add_member(tar, name, data)
    meta = json.loads(files[f"{key}.json"])
    record.update(
        width=size[0], height=size[1], original_width=meta["original_width"], original_height=meta["original_height"]
    )
    return record


def _write_status_table(path: Path, statuses: list[dict[str, Any]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    types = {"http_status": pa.int32(), "width": pa.int32(), "height": pa.int32(), "original_width": pa.int32(),
             "original_height": pa.int32(), "bytes": pa.int64()}  # fmt: skip
    schema = pa.schema([(name, types.get(name, pa.string())) for name in STATUS_COLUMNS])
    table = pa.Table.from_pylist(statuses, schema=schema)
    atomic_write(path, lambda f: pq.write_table(table, f))
    path.chmod(0o644)


def status_table(out: str | Path) -> Any:
    """Every URL's status row of a download folder, shard by shard (a ``pyarrow.Table``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    paths = sorted(Path(out).glob("[0-9]*.parquet"))
    if not paths:
        raise LipkitError(f"{out} holds no status tables (NNNNN.parquet)")
    return pa.concat_tables([pq.read_table(p) for p in paths])


def _summarise(out: Path, jobs: list[ShardJob], written: int, seconds: float) -> DownloadResult:
    count = successes = 0
    failures: Counter[str] = Counter()
    for job in jobs:
        stats = json.loads(stats_path(out, job.shard).read_text())
        count += stats["count"]
        successes += stats["successes"]
        failures.update(stats["failures"])
    return DownloadResult(out, len(jobs), written, count, successes, dict(sorted(failures.items())), seconds)

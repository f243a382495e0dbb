"""The embedding job behind ``lipkit embed``: a data spec -> an embeddings folder (see :mod:`lipkit.data.embeddings`).

The job lists the items of the spec (:mod:`lipkit.index.items`), compares them with the parts already
in the folder, and embeds only what is missing, in new parts of ``part_size`` items:

* **Resume.** Each part is written atomically, its Parquet table last, and records the digest of its
  inputs: the model fingerprint, the modalities, the thumbnail setting and every item's key and
  stamp. A re-run keeps every part whose digest still matches; a part cut off by a crash (or damaged
  since) is left out and its items are embedded again, so a crash loses at most the parts in flight.
* **Incremental.** Items are matched by key and stamp, for every kind of source. On a folder of images
  the stamp is the file's size and modification time with a hash of its caption, so a re-run embeds
  only new and changed files; rows of removed or changed files are dropped, by rewriting their parts
  from the vectors already there (no model work). Parts are never renumbered: new items go into new
  parts after the last one.
* **Failures.** An item whose image or caption cannot be read is skipped and counted by reason, in its
  part and in the manifest; it is tried again only when its stamp changes.

The folder holds one model's vectors of one data spec: a run with another model, data spec,
modalities or thumbnail setting is refused (choose another folder). Where the stages run is chosen by
:func:`lipkit.index.runners.choose_runner`.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lipkit.data.embeddings import (
    FORMAT,
    STAMP,
    VERSION,
    EmbeddingsError,
    PartInfo,
    load_vectors,
    part_name,
    part_number,
    read_manifest,
    read_table,
    write_manifest,
    write_part,
)
from lipkit.errors import ConfigError, LipkitError
from lipkit.index.items import Listing, list_items
from lipkit.index.stages import MODALITIES
from lipkit.utils import strict_json

if TYPE_CHECKING:
    from lipkit.index.encoder import ModelRecord, QueryEncoder
    from lipkit.index.runners import LocalRunner


@dataclass(frozen=True)
class EmbedOptions:
    """What to embed and how.

    Attributes:
        data: A pair source spec (``tuxpaint:all``, a folder, a table, shards; see :mod:`lipkit.data.spec`).
        out: The embeddings folder.
        modalities: Which vectors to make: ``image`` and/or ``text``.
        thumbnails: Store a JPEG thumbnail (longest side 160 px) of each image.
        batch_size: Items per model call.
        part_size: Items per part.
        limit: Embed only the first ``limit`` items of the spec.
        progress: Show a progress bar.
    """

    data: str
    out: Path
    modalities: tuple[str, ...] = MODALITIES
    thumbnails: bool = True
    batch_size: int = 64
    part_size: int = 10_000
    limit: int | None = None
    progress: bool = True

    def check(self) -> None:
        """Raises ConfigError on an unknown or repeated modality, or a size below 1."""
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown or not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"modalities must be one or both of {', '.join(MODALITIES)}, got {list(self.modalities)}")
        for name in ("batch_size", "part_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")


@dataclass
class EmbedSummary:
    """What a run did.

    Attributes:
        items: Items in the folder now.
        embedded: Items embedded by this run.
        kept: Items kept from earlier runs.
        removed: Rows dropped because their item was removed or changed.
        skipped: Items that could not be embedded (in the folder's parts), by reason.
        source_skipped: Pairs the sources dropped when opened (no caption...), by reason.
        parts: Parts in the folder.
        seconds: Wall time of the run.
    """

    items: int
    embedded: int
    kept: int
    removed: int
    skipped: dict[str, int]
    source_skipped: dict[str, int]
    parts: int
    seconds: float = 0.0


@dataclass
class Settings:
    """What the vectors of a folder depend on besides the items."""

    record: ModelRecord
    modalities: tuple[str, ...]
    thumbnails: bool
    data: str

    @property
    def digest(self) -> str:
        inputs = {"model": self.record.fingerprint, "modalities": list(self.modalities), "thumbnails": self.thumbnails}
        return hashlib.sha256(strict_json(inputs, sort_keys=True).encode()).hexdigest()

    def input_digest(self, items: Sequence[tuple[str, str]]) -> str:
        """The digest of a part's inputs: these settings and its items' keys and stamps, in order."""
        h = hashlib.sha256(self.digest.encode())
        h.update(strict_json([list(item) for item in items]).encode())
        return h.hexdigest()


@dataclass
class PartState:
    """A part found in the folder: its info and its rows' keys and stamps."""

    info: PartInfo
    keys: list[str]
    stamps: list[str]

    def items(self) -> list[tuple[str, str]]:
        """Keys and stamps of its rows, then of its failed items (the order of the input digest)."""
        return [*zip(self.keys, self.stamps), *((k, s) for k, s, _ in self.info.failed)]


@dataclass
class Plan:
    """How the folder is brought up to date.

    Attributes:
        keep: Parts kept as they are.
        rewrite: Parts that keep only some rows: name -> (row mask, failed items kept).
        drop: Parts (and damaged or stray part files) removed.
        new: Parts to embed: (name, item indexes).
        removed: Rows dropped from kept parts' items (removed or changed items).
    """

    keep: list[str] = field(default_factory=list)
    rewrite: dict[str, tuple[np.ndarray, list[list[str]]]] = field(default_factory=dict)
    drop: list[str] = field(default_factory=list)
    new: list[tuple[str, list[int]]] = field(default_factory=list)
    removed: int = 0


def embed_collection(encoder: QueryEncoder, options: EmbedOptions, runner: LocalRunner | None = None) -> EmbedSummary:
    """Embed a data spec into an embeddings folder, resuming and updating what is there.

    Args:
        encoder: The model (its device is where a local runner runs it).
        options: What to embed and how.
        runner: Where to run the stages (default: this process; see :func:`~lipkit.index.runners.choose_runner`).

    Returns:
        What the run did (on every rank under torchrun; complete on rank 0).

    Raises:
        ConfigError: Bad options.
        LipkitError: The data spec cannot be opened, or the folder holds another model's or spec's vectors.
        StorageError: The folder cannot be written.
    """
    from lipkit.index.runners import LocalRunner
    from lipkit.utils import FolderLock

    start = time.perf_counter()
    options.check()
    runner = runner or LocalRunner(encoder.device)
    settings = Settings(encoder.record, tuple(options.modalities), options.thumbnails, options.data)
    listing = list_items(options.data, options.limit)
    lock = FolderLock(Path(options.out), "lipkit embed") if runner.rank == 0 else None
    try:
        plan, infos = _agree_on_plan(runner, lock, options, settings, listing)
        _embed_parts(encoder, options, runner, settings, listing, plan, infos)
        runner.barrier()
        if runner.rank == 0 and not runner.writes_manifest_per_part:
            infos = _found_parts(Path(options.out), settings, [*infos, *(n for n, _ in plan.new)])
            _write_manifest(Path(options.out), settings, listing, infos)
    finally:
        if lock is not None:
            lock.release()
    return _summary(plan, infos, listing, time.perf_counter() - start)


def _agree_on_plan(
    runner: LocalRunner, lock: Any, options: EmbedOptions, settings: Settings, listing: Listing
) -> tuple[Plan, dict[str, PartInfo]]:
    """Rank 0 plans and tidies the folder; every rank gets the plan (or rank 0's error)."""
    result: Any = None
    if runner.rank == 0:
        try:
            lock.acquire()
            result = _prepare(Path(options.out), settings, listing, options.part_size)
        except Exception as exc:  # the other ranks wait for the plan: tell them, then fail here
            runner.broadcast(("error", str(exc)))
            raise
    result = runner.broadcast(("plan", result))
    if result[0] == "error":
        raise LipkitError(result[1])
    return result[1]


def _prepare(out: Path, settings: Settings, listing: Listing, part_size: int) -> tuple[Plan, dict[str, PartInfo]]:
    _check_folder(out, settings)
    states, stray = scan_parts(out, settings.record.embed_dim, settings.modalities)
    plan = plan_update(listing, states, settings, part_size)
    plan.drop += stray
    infos = _apply(out, plan, states, settings, listing)
    return plan, infos


def _check_folder(out: Path, settings: Settings) -> None:
    """Refuse a folder that holds vectors of another model, spec, modalities or thumbnail setting."""
    manifest = read_manifest(out)
    if manifest is None:
        return
    found = {
        "model": manifest["model"].get("fingerprint"),
        "data spec": manifest.get("data"),
        "modalities": list(manifest["modalities"]),
        "thumbnail setting": manifest.get("thumbnails"),
    }
    wanted = {
        "model": settings.record.fingerprint,
        "data spec": settings.data,
        "modalities": list(settings.modalities),
        "thumbnail setting": settings.thumbnails,
    }
    for what, value in found.items():
        if value != wanted[what]:
            shown = (lambda v: str(v)[:12]) if what == "model" else repr
            raise LipkitError(
                f"{out} holds embeddings of another {what} ({shown(value)}, this run: {shown(wanted[what])}); "
                "choose another --out-dir, or delete that folder"
            )


def scan_parts(out: Path, embed_dim: int, modalities: Sequence[str]) -> tuple[dict[str, PartState], list[str]]:
    """The readable parts in a folder, and the names of part files that are not (damaged, cut off, stray)."""
    names = {p.name.split(".")[0] for p in out.glob("part-*")} if out.is_dir() else set()
    states, stray = {}, []
    for name in sorted(n for n in names if part_number(n) is not None):
        try:
            states[name] = _read_state(out, name, embed_dim, modalities)
        except EmbeddingsError:
            stray.append(name)
    return states, stray


def _read_state(out: Path, name: str, embed_dim: int, modalities: Sequence[str]) -> PartState:
    columns, info = read_table(out, name, ["key", STAMP])
    keys, stamps = [str(k) for k in columns["key"]], [str(s) for s in columns[STAMP]]
    for modality in modalities:
        shape = load_vectors(out, name, modality, mmap=True).shape
        if shape != (len(keys), embed_dim) or info.rows != len(keys):
            raise EmbeddingsError(f"{name}: {shape} {modality} vectors for {len(keys)} keys")
    return PartState(info, keys, stamps)


def plan_update(listing: Listing, states: dict[str, PartState], settings: Settings, part_size: int) -> Plan:
    """Which parts to keep, trim or drop, and which items to embed into which new parts (a pure function)."""
    current = dict(zip(listing.keys, listing.stamps))
    covered: set[str] = set()
    plan = Plan()
    for name, state in states.items():
        if settings.input_digest(state.items()) != state.info.input:
            plan.drop.append(name)  # made with other settings, or altered
            continue
        rows = np.array([current.get(k) == s and k not in covered for k, s in zip(state.keys, state.stamps)], bool)
        failed = [f for f in state.info.failed if current.get(f[0]) == f[1] and f[0] not in covered]
        covered.update(k for k, ok in zip(state.keys, rows) if ok)
        covered.update(f[0] for f in failed)
        plan.removed += int((~rows).sum())
        if rows.all() and len(failed) == len(state.info.failed):
            plan.keep.append(name)
        elif rows.any() or failed:
            plan.rewrite[name] = (rows, failed)
        else:
            plan.drop.append(name)
    todo = [i for i, key in enumerate(listing.keys) if key not in covered]
    first = max((part_number(n) or 0 for n in states), default=-1) + 1
    plan.new = [(part_name(first + j), todo[s : s + part_size]) for j, s in enumerate(range(0, len(todo), part_size))]
    return plan


def _apply(
    out: Path, plan: Plan, states: dict[str, PartState], settings: Settings, listing: Listing
) -> dict[str, PartInfo]:
    """Trim the parts to rewrite, list what stays in the manifest, then remove dropped files."""
    from lipkit.utils import atomic_temporaries

    infos = {name: states[name].info for name in plan.keep}
    for name, (rows, failed) in plan.rewrite.items():
        infos[name] = _trim_part(out, name, states[name], rows, failed, settings)
    _write_manifest(out, settings, listing, infos)
    for name in plan.drop:
        for file in out.glob(f"{name}.*"):
            file.unlink(missing_ok=True)
    for tmp in atomic_temporaries(out, "part-*"):
        tmp.unlink(missing_ok=True)
    return infos


def _trim_part(
    out: Path, name: str, state: PartState, rows: np.ndarray, failed: list[list[str]], settings: Settings
) -> PartInfo:
    columns, _ = read_table(out, name)
    vectors = {m: load_vectors(out, name, m)[rows] for m in settings.modalities}
    kept = {c: [v for v, ok in zip(values, rows) if ok] for c, values in columns.items()}
    items = [*zip(kept["key"], kept[STAMP]), *((k, s) for k, s, _ in failed)]
    info = PartInfo(int(rows.sum()), settings.input_digest(items), _reasons(failed), failed)
    write_part(out, name, vectors, kept, info)
    return info


def _reasons(failed: list[list[str]]) -> dict[str, int]:
    return dict(Counter(reason for _, _, reason in failed))


def _embed_parts(
    encoder: QueryEncoder,
    options: EmbedOptions,
    runner: LocalRunner,
    settings: Settings,
    listing: Listing,
    plan: Plan,
    infos: dict[str, PartInfo],
) -> None:
    """Embed this process's share of the new parts, writing each part as it completes."""
    from tqdm.auto import tqdm

    from lipkit.index.runners import plan_batches
    from lipkit.index.stages import Decoder

    mine = runner.share(plan.new)
    out = Path(options.out)

    def written(name: str, info: PartInfo) -> None:
        infos[name] = info
        if runner.writes_manifest_per_part:
            _write_manifest(out, settings, listing, infos)

    assembler = PartAssembler(out, listing, settings, mine, written)
    decoder = Decoder(listing.source, encoder.model.cfg, settings.modalities, settings.thumbnails)
    total = sum(len(indexes) for _, indexes in mine)
    show = options.progress and runner.rank == 0
    with tqdm(total=total, desc="embedding", unit="item", disable=not show) as bar:
        for batch in runner.run(decoder, encoder.model, plan_batches(mine, options.batch_size)):
            assembler.add(batch)
            bar.update(len(batch["index"]))
    assembler.check_done()


class PartAssembler:
    """Collects embedded batches (in any order) and writes each part once all its items are in.

    Args:
        out: The embeddings folder.
        listing: The items.
        settings: The run's settings (for the input digest).
        parts: The parts to expect: (name, item indexes in part order).
        written: Called with each part's name and info once written.
    """

    def __init__(
        self,
        out: Path,
        listing: Listing,
        settings: Settings,
        parts: list[tuple[str, list[int]]],
        written: Callable[[str, PartInfo], None],
    ) -> None:
        self.out, self.listing, self.settings, self.written = out, listing, settings, written
        self.expected = {name: list(indexes) for name, indexes in parts}
        self.pending: dict[str, list[dict[str, np.ndarray]]] = {name: [] for name in self.expected}

    def add(self, batch: dict[str, np.ndarray]) -> None:
        """Take one embedded batch (its rows may belong to several parts)."""
        names = np.asarray(batch["part"]).astype(str)
        for name in np.unique(names):
            mask = names == name
            self.pending[name].append({c: np.asarray(v)[mask] for c, v in batch.items()})
            if sum(len(b["index"]) for b in self.pending[name]) == len(self.expected[name]):
                self._write(name, self.pending.pop(name))

    def check_done(self) -> None:
        """Raises LipkitError if a part never got all its items (a runner lost some)."""
        if self.pending:
            raise LipkitError(f"the runner returned only part of {', '.join(sorted(self.pending))}")

    def _write(self, name: str, batches: list[dict[str, np.ndarray]]) -> None:
        rows = {c: np.concatenate([b[c] for b in batches]) for c in batches[0]}
        position = {index: j for j, index in enumerate(self.expected[name])}
        order = np.argsort([position[int(i)] for i in rows["index"]], kind="stable")
        rows = {c: v[order] for c, v in rows.items()}
        ok = rows["ok"].astype(bool)
        indexes = [int(i) for i in rows["index"]]
        stamps = self.listing.stamps
        failed = [[self.listing.keys[i], stamps[i], str(r)] for i, r, g in zip(indexes, rows["reason"], ok) if not g]
        kept = [i for i, g in zip(indexes, ok) if g]
        items = [*((self.listing.keys[i], stamps[i]) for i in kept), *((k, s) for k, s, _ in failed)]
        info = PartInfo(len(kept), self.settings.input_digest(items), _reasons(failed), failed)
        dim = self.settings.record.embed_dim
        vectors = {m: np.asarray(rows[m][ok], np.float32).reshape(len(kept), dim) for m in self.settings.modalities}
        write_part(self.out, name, vectors, self._columns(rows, ok, kept), info)
        self.written(name, info)

    def _columns(self, rows: dict[str, np.ndarray], ok: np.ndarray, kept: list[int]) -> dict[str, list[Any]]:
        listed = self.listing.metadata(kept)
        columns = {"key": listed.pop("key"), "caption": [str(c) for c in rows["caption"][ok]]}
        columns["source"], columns["path"] = listed.pop("source"), listed.pop("path")
        columns["thumbnail"] = [t if t is None else bytes(t) for t in rows["thumbnail"][ok]]
        if self.settings.thumbnails or "image" in self.settings.modalities:
            columns["width"] = [int(w) for w in rows["width"][ok]]
            columns["height"] = [int(h) for h in rows["height"][ok]]
        return {**columns, **listed}


def _found_parts(out: Path, settings: Settings, names: Sequence[str]) -> dict[str, PartInfo]:
    """The infos of the named parts that are in the folder, whole (after the ranks of torchrun wrote theirs)."""
    states, _ = scan_parts(out, settings.record.embed_dim, settings.modalities)
    return {name: states[name].info for name in names if name in states}


def _write_manifest(out: Path, settings: Settings, listing: Listing, infos: dict[str, PartInfo]) -> None:
    names = sorted(infos, key=lambda n: part_number(n) or 0)
    skipped: Counter[str] = Counter()
    for info in infos.values():
        skipped.update(info.skipped)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "model": settings.record.to_dict(),
        "modalities": list(settings.modalities),
        "data": settings.data,
        "thumbnails": settings.thumbnails,
        "items": sum(info.rows for info in infos.values()),
        "skipped": dict(skipped),
        "source_skipped": {k: v for k, v in listing.skipped.items() if v},
        "parts": {name: infos[name].to_manifest() for name in names},
    }
    write_manifest(out, manifest)


def _summary(plan: Plan, infos: dict[str, PartInfo], listing: Listing, seconds: float) -> EmbedSummary:
    new = {name for name, _ in plan.new}
    skipped: Counter[str] = Counter()
    for info in infos.values():
        skipped.update(info.skipped)
    return EmbedSummary(
        items=sum(info.rows for info in infos.values()),
        embedded=sum(info.rows for name, info in infos.items() if name in new),
        kept=sum(info.rows for name, info in infos.items() if name not in new),
        removed=plan.removed,
        skipped=dict(skipped),
        source_skipped={k: v for k, v in listing.skipped.items() if v},
        parts=len(infos),
        seconds=seconds,
    )

"""The curation pipeline behind ``lipkit data curate``: a data spec -> kept keys, provenance, a data card.

Steps, in order (a sample leaves at the first step that drops it):

1. **Read** (runner): each sample's caption, image bytes (their SHA-256), size and perceptual hash.
   An unreadable caption or an undecodable image drops the sample (stage ``unreadable``); a caption that
   is not UTF-8 is read as Windows-1252, kept and counted.
2. **Embeddings** (with ``embeddings``): each sample's image and text vectors, by key; samples missing
   from the folder are dropped (``no_embedding``).
3. **Filters**: caption length, image size, aspect ratio, image-text score (:mod:`.filters`).
4. **Dedup** among the samples left: exact, near, caption, semantic, in that order (:mod:`.dedup`).
5. **Match** (runner) every readable caption against the metadata (:mod:`.match`), and **balance** the
   samples left (MetaCLIP; :mod:`.balance`): entry counts are taken over the samples that reach this
   step, so duplicates and filtered samples do not use up an entry's budget ``t``.

The kept keys depend only on the data, the settings and the seed: every random choice is a hash of
(key, entry, seed), every duplicate group keeps its smallest key, and the runner's outputs are put back
in input order, so 1, 2 or 3 processes and a Ray cluster give the same keys.

Output folder: ``keys.txt`` (kept keys, input order), ``provenance.parquet`` (:mod:`.provenance`),
``curation.json`` (the settings, to run the same curation again, and the counts), ``metadata.tsv`` (the
entries matched), ``card.html`` (:mod:`.card`) and, with ``write="shards"``, ``shards/`` in img2dataset's
layout.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lipkit.data.curation import CurationError
from lipkit.data.curation.card import write_card
from lipkit.data.curation.config import DEDUP_KINDS, CurateConfig, CurateResult, Rows, config_dict
from lipkit.data.curation.provenance import KEPT, Ledger
from lipkit.data.curation.samples import caption_fallback, image_bytes
from lipkit.data.decode import BadSample, open_image
from lipkit.data.pairs import PairSource

if TYPE_CHECKING:
    from lipkit.data.curation.metadata import Metadata
    from lipkit.data.curation.runner import Batch, Runner
    from lipkit.data.pack import PackResult

# ----------------------------------------------------------------------------------------------- reading


def read_stage(batch: Batch, source: PairSource, phash: bool) -> Batch:
    """Runner stage: caption, image facts and read errors of the pairs at ``batch["index"]``."""
    rows = [_read_one(source, int(i), phash) for i in batch["index"].tolist()]
    return {
        "caption": np.array([r[0] for r in rows], object),
        "error": np.array([r[1] for r in rows], object),
        "digest": np.array([r[2] for r in rows], object),
        "phash": np.array([r[3] for r in rows], np.uint64),
        "width": np.array([r[4] for r in rows], np.int64),
        "height": np.array([r[5] for r in rows], np.int64),
        "fallback": np.array([r[6] for r in rows], bool),
    }


def _read_one(source: PairSource, index: int, phash: bool) -> tuple[str, str, str, int, int, int, bool]:
    from lipkit.data.curation.dedup import image_digest, image_phash

    caption = ""
    try:
        caption = source.caption(index)
        fallback = caption_fallback(source, index)
        if not caption.strip():
            return caption, "empty caption", "", 0, 0, 0, fallback
        data = image_bytes(source, index)
        image = open_image(data)
        return caption, "", image_digest(data), image_phash(image) if phash else 0, *image.size, fallback
    except BadSample as exc:
        return caption, f"{exc.reason}: {exc}", "", 0, 0, 0, False


def match_stage(batch: Batch, matcher: Any) -> Batch:
    """Runner stage: the matched entry ids of each caption, as space-separated text."""
    found = matcher.match_batch([str(c) for c in batch["caption"].tolist()])
    return {"matches": np.array([" ".join(map(str, ids)) for ids in found], object)}


def open_rows(config: CurateConfig) -> tuple[PairSource, list[str], dict[str, int]]:
    """The source of the spec, its keys (the first ``limit``) and what its sources left out when opened.

    Raises:
        CurationError: A weighted spec, or two pairs with one key.
    """
    from lipkit.data.spec import open_mixture, parse_spec

    if any(entry.weight is not None for entry in parse_spec(config.data)):
        raise CurationError(f"data spec {config.data!r}: weights are for training mixtures; curate the sources")
    mixture = open_mixture(config.data)
    source = mixture.as_source()
    n = len(source) if config.limit is None else min(len(source), config.limit)
    keys = [source.key(i) for i in range(n)]
    if len(set(keys)) != len(keys):
        seen: set[str] = set()
        twice = next(k for k in keys if k in seen or seen.add(k))
        raise CurationError(f"data spec {config.data!r}: key {twice!r} appears twice; curate those sources apart")
    return source, keys, mixture.skipped


def batches_of(columns: dict[str, np.ndarray], size: int) -> list[Batch]:
    """Cut equally long columns into batches of ``size`` rows."""
    n = len(next(iter(columns.values())))
    return [{k: v[i : i + size] for k, v in columns.items()} for i in range(0, n, size)]


def run_stage(runner: Runner, stage: Any, columns: dict[str, np.ndarray], size: int, **context: Any) -> Batch:
    """Run a stage over columns in batches and join the outputs (in input order)."""
    if not len(next(iter(columns.values()))):
        return {}
    out = runner.map(stage, batches_of(columns, size), context)
    return {name: np.concatenate([b[name] for b in out]) for name in out[0]}


# -------------------------------------------------------------------------------------------- the steps


def drop_unreadable(rows: Rows) -> None:
    bad = np.flatnonzero(rows.read["error"] != "")
    rows.ledger.drop(bad, "unreadable", rows.read["error"][bad].tolist())


def attach_embeddings(rows: Rows, folder: str, need_text: bool) -> None:
    """Look up each live row's vectors by key; drop the rows the folder lacks.

    Raises:
        LipkitError: The folder is not an embeddings folder, lacks a modality, or holds none of the keys.
    """
    from lipkit.data.embeddings import open_embeddings

    emb = open_embeddings(folder)
    wanted = ["image", "text"] if need_text else ["image"]
    missing = [m for m in wanted if m not in emb.modalities]
    if missing:
        raise CurationError(f"{folder} has no {missing[0]} vectors; embed with --modalities image,text")
    found: dict[str, tuple[int, int]] = {}
    parts = []
    for p, part in enumerate(emb.iter_parts()):
        parts.append({m: part.vectors[m] for m in wanted})
        found.update({k: (p, i) for i, k in enumerate(part.keys)})
    alive = rows.ledger.alive()
    lacking = [i for i in alive.tolist() if rows.keys[i] not in found]
    if len(lacking) == len(alive) and len(alive):
        raise CurationError(f"{folder} holds none of the samples' keys: embed the same data spec ({emb.data!r} there)")
    rows.ledger.drop(lacking, "no_embedding", f"not in {folder}")
    dim = emb.record.embed_dim
    for m in wanted:
        rows.vectors[m] = np.zeros((len(rows.keys), dim), np.float32)
        for i in rows.ledger.alive().tolist():
            p, j = found[rows.keys[i]]
            rows.vectors[m][i] = parts[p][m][j]
    if need_text:
        from lipkit.data.curation.filters import image_text_scores

        rows.scores = image_text_scores(rows.vectors["image"], rows.vectors["text"])


def apply_filters(rows: Rows, config: CurateConfig) -> None:
    """Caption length, image size, aspect ratio, then the image-text score."""
    from lipkit.data.curation import filters

    read, alive = rows.read, rows.ledger.alive()
    captions = [str(c) for c in read["caption"][alive].tolist()]
    ok = filters.caption_mask(captions, config.min_words, config.min_chars)
    rows.ledger.drop(alive[~ok], "caption", [_caption_reason(c, config) for c, good in zip(captions, ok) if not good])
    alive = rows.ledger.alive()
    w, h = read["width"][alive], read["height"][alive]
    small = alive[~filters.size_mask(w, h, config.min_side)]
    rows.ledger.drop(
        small,
        "image_size",
        [f"shorter side {min(read['width'][i], read['height'][i])} < {config.min_side}" for i in small],
    )
    alive = rows.ledger.alive()
    ratio = filters.aspect_ratio(read["width"][alive], read["height"][alive])
    wide = ~filters.aspect_mask(read["width"][alive], read["height"][alive], config.max_aspect)
    rows.ledger.drop(alive[wide], "aspect", [f"aspect {r:.2f} > {config.max_aspect:g}" for r in ratio[wide]])
    if rows.scores is not None:
        apply_score_filter(rows, config)


def _caption_reason(caption: str, config: CurateConfig) -> str:
    from lipkit.data.curation.filters import word_count

    words = word_count(caption)
    if words < config.min_words:
        return f"{words} words < {config.min_words}"
    return f"{len(caption.strip())} characters < {config.min_chars}"


def apply_score_filter(rows: Rows, config: CurateConfig) -> None:
    from lipkit.data.curation import filters

    alive = rows.ledger.alive()
    scores = rows.scores[alive]
    if config.top_fraction is not None:
        keep = filters.top_fraction_mask([rows.keys[i] for i in alive], scores, config.top_fraction)
        why = f"not in the top {config.top_fraction:g}"
    elif config.min_score is not None:
        keep, why = filters.score_mask(scores, config.min_score), f"< {config.min_score:g}"
    else:
        return
    rows.ledger.drop(alive[~keep], "score", [f"score {s:.3f} {why}" for s in scores[~keep]])


def apply_dedup(rows: Rows, config: CurateConfig) -> None:
    """The chosen duplicate finders, in :data:`DEDUP_KINDS` order, each among the rows the earlier left."""
    from lipkit.data.curation import dedup

    for kind in (k for k in DEDUP_KINDS if k in config.dedup):
        alive = rows.ledger.alive()
        keys = [rows.keys[i] for i in alive]
        detail: dict[str, str] = {}
        if kind == "exact":
            found = dedup.exact_duplicates(keys, rows.read["digest"][alive].tolist())
        elif kind == "near":
            found = dedup.near_duplicates(keys, rows.read["phash"][alive], config.near_distance)
            detail = {k: f" (distance {d:.0f})" for k, d in found.similarity.items()}
        elif kind == "caption":
            found = dedup.caption_duplicates(keys, [str(c) for c in rows.read["caption"][alive].tolist()])
        else:
            vectors = rows.vectors["image"][alive]
            found = dedup.semantic_duplicates(
                keys, vectors, config.semantic_threshold, config.semantic_clusters, config.seed
            )
            detail = {k: f" (cosine {s:.3f})" for k, s in found.similarity.items()}
        rows.ledger.drop_duplicates(alive, f"{kind}_dup", found.kept_for, detail)


def match_rows(rows: Rows, config: CurateConfig, runner: Runner) -> Metadata | None:
    """Build the metadata from the readable captions and match every readable caption against it."""
    if not config.metadata:
        return None
    from lipkit.data.curation.match import Matcher
    from lipkit.data.curation.metadata import build_metadata

    readable = np.flatnonzero(rows.read["error"] == "")
    captions = rows.read["caption"][readable]
    metadata = build_metadata(
        config.metadata,
        [str(c) for c in captions.tolist()],
        min_count=config.min_count,
        min_bigram_count=config.min_bigram_count,
        min_pmi=config.min_pmi,
    )
    out = run_stage(runner, match_stage, {"caption": captions}, config.batch_size, matcher=Matcher(metadata.entries))
    rows.matches = [[] for _ in rows.keys]
    for i, text in zip(readable.tolist(), out.get("matches", np.zeros(0, object)).tolist()):
        rows.matches[i] = [int(x) for x in str(text).split()]
    return metadata


def apply_balance(rows: Rows, config: CurateConfig, n_entries: int) -> None:
    """MetaCLIP's sampling over the rows left: per-entry counts, ``p = t / max(count, t)``, hashed coins."""
    from lipkit.data.curation.balance import count_matches, entry_probability, keep_mask

    if config.balance is None or rows.matches is None:
        return
    alive = rows.ledger.alive()
    matches = [rows.matches[i] for i in alive]
    probs = entry_probability(count_matches(matches, n_entries), config.balance)
    rows.keep_probability = np.full(len(rows.keys), np.nan)
    chance = np.array([1 - np.prod(1 - probs[m]) if m else float(config.keep_unmatched) for m in matches])
    rows.keep_probability[alive] = chance
    keep = keep_mask([rows.keys[i] for i in alive], matches, probs, config.seed, config.keep_unmatched)
    reasons = ["no metadata entry matched" if not m else f"not sampled (p = {c:.3g})" for m, c in zip(matches, chance)]
    rows.ledger.drop(alive[~keep], "balance", [r for r, k in zip(reasons, keep) if not k])


# -------------------------------------------------------------------------------------------- the run


def curate(config: CurateConfig, runner: Runner | None = None, progress: bool = False) -> CurateResult:
    """Curate a data spec into ``config.out`` (see the module docstring).

    Args:
        config: The settings.
        runner: Where the read and match stages run (default: this process).
        progress: Print a line as each step starts.

    Raises:
        CurationError: Bad settings, an empty metadata list, duplicate keys, embeddings of other data.
        LipkitError: The data spec cannot be opened (a missing or unreadable shard...).
        FolderInUseError: Another curation writes to the same folder.
        StorageError: The folder cannot be written.
    """
    from lipkit.data.curation.runner import LocalRunner
    from lipkit.utils import FolderLock

    start = time.perf_counter()
    config.check()
    runner = runner or LocalRunner(1)
    out = Path(config.out)
    say = functools.partial(_say, progress)
    with FolderLock(out, "lipkit data curate"):
        source, keys, skipped = open_rows(config)
        say(f"reading {len(keys)} samples ({runner.description})")
        columns = {"index": np.arange(len(keys), dtype=np.int64)}
        read = run_stage(runner, read_stage, columns, config.batch_size, source=source, phash="near" in config.dedup)
        rows = Rows(keys, read, Ledger(keys))
        drop_unreadable(rows)
        say("matching captions against the metadata")
        metadata = match_rows(rows, config, runner)
        if config.embeddings:
            attach_embeddings(rows, config.embeddings, config.min_score is not None or config.top_fraction is not None)
        say("filtering and deduplicating")
        apply_filters(rows, config)
        apply_dedup(rows, config)
        apply_balance(rows, config, len(metadata) if metadata else 0)
        say("writing the output")
        return _write_outputs(source, rows, metadata, config, runner, skipped, time.perf_counter() - start)


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"curate: {text}", flush=True)


def _write_outputs(
    source: PairSource,
    rows: Rows,
    metadata: Metadata | None,
    config: CurateConfig,
    runner: Runner,
    skipped: dict[str, int],
    seconds: float,
) -> CurateResult:
    from lipkit.data.curation.provenance import write_provenance
    from lipkit.utils import atomic_write_text, strict_json

    out = Path(config.out)
    kept = rows.ledger.alive()
    atomic_write_text(out / "keys.txt", "".join(f"{rows.keys[i]}\n" for i in kept))
    write_provenance(out / "provenance.parquet", rows.ledger, _provenance_columns(rows, metadata))
    if metadata is not None:
        metadata.save(out / "metadata.tsv")
    counts = rows.ledger.counts()
    result = CurateResult(
        out,
        len(rows.keys),
        counts.pop(KEPT),
        counts,
        int(rows.read.get("fallback", np.zeros(0, bool)).sum()),
        {reason: n for reason, n in skipped.items() if n},
        len(metadata) if metadata else 0,
    )
    if config.write == "shards":
        result.shards = write_shards(source, kept, rows, config)
    result.seconds = round(seconds, 3)
    record = {"config": config_dict(config), "runner": runner.description, "result": _result_dict(result)}
    atomic_write_text(out / "curation.json", strict_json(record, indent=1) + "\n")
    write_card(out / "card.html", source, rows, metadata, config, result)
    return result


def _result_dict(result: CurateResult) -> dict[str, Any]:
    return {
        "total": result.total,
        "kept": result.kept,
        "dropped": result.dropped,
        "caption_fallbacks": result.caption_fallbacks,
        "source_skipped": result.source_skipped,
        "entries": result.entries,
        "seconds": result.seconds,
    }


def _provenance_columns(rows: Rows, metadata: Metadata | None) -> dict[str, Any]:
    n = len(rows.keys)
    entries = [[metadata.entries[j] for j in m] for m in rows.matches] if metadata and rows.matches else [[]] * n
    keep_p = rows.keep_probability
    scores = rows.scores
    return {
        "caption": [str(c) for c in rows.read["caption"].tolist()],
        "entries": entries,
        "keep_probability": [None if keep_p is None or np.isnan(keep_p[i]) else float(keep_p[i]) for i in range(n)],
        "score": [
            None if scores is None or rows.ledger.stage[i] in ("unreadable", "no_embedding") else float(scores[i])
            for i in range(n)
        ],
        "width": rows.read["width"],
        "height": rows.read["height"],
        "caption_fallback": rows.read["fallback"],
    }


# ----------------------------------------------------------------------------------------------- shards


@dataclass(frozen=True)
class SourceImage:
    """A pair's image read from its source (picklable: the packer's workers load it)."""

    source: PairSource
    index: int

    def load(self, max_side: int | None) -> Any:
        """The decoded image (and its bytes, when they are a plain JPEG that can be copied unchanged)."""
        from lipkit.data.decode import open_for_max_side
        from lipkit.data.pack import Decoded

        data = image_bytes(self.source, self.index)
        img, original = open_for_max_side(data, max_side)
        plain = img.format == "JPEG" and img.size == original and img.mode in ("RGB", "L")
        return Decoded(img, original, data if plain else None)


def write_shards(source: PairSource, kept: np.ndarray, rows: Rows, config: CurateConfig) -> PackResult:
    """Pack the kept pairs into ``out/shards`` (img2dataset's layout; each sample's ``source`` is its key)."""
    from lipkit.data.pack import Item, PackOptions, pack

    items = [
        Item(
            rows.keys[i],
            str(rows.read["caption"][i]),
            SourceImage(source, int(i)),
            caption_fallback=bool(rows.read["fallback"][i]),
        )
        for i in kept.tolist()
    ]
    if not items:
        raise CurationError("nothing was kept, so there is nothing to write as shards; loosen the settings")
    return pack(items, Path(config.out) / "shards", PackOptions(config.samples_per_shard), progress=False)

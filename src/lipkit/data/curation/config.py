"""The settings and results of a curation, and the pipeline's view of the samples (:mod:`.curate` runs it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lipkit.data.curation import CurationError
from lipkit.data.curation.provenance import Ledger

if TYPE_CHECKING:
    from lipkit.data.pack import PackResult

DEDUP_KINDS = ("exact", "near", "caption", "semantic")
WRITE_KINDS = ("keys", "shards")


@dataclass(frozen=True)
class CurateConfig:
    """Every setting of a curation (saved in ``curation.json`` beside the output).

    Attributes:
        data: The data spec to curate (see :mod:`lipkit.data.spec`; no weights).
        out: The output folder.
        metadata: Metadata sources: ``wordnet``, ``unigrams``, ``bigrams`` and list files; empty: no matching.
        min_count: Mined unigrams: the fewest occurrences.
        min_bigram_count: Mined bigrams: the fewest occurrences.
        min_pmi: Mined bigrams: the lowest PMI, in bits.
        balance: MetaCLIP's per-entry threshold ``t`` (``None``: no balancing).
        keep_unmatched: Balancing keeps samples that match no entry (MetaCLIP drops them).
        min_words: Captions need at least this many words (0: no check).
        min_chars: Captions need at least this many characters (0: no check).
        min_side: Images need a shorter side of at least this many pixels (0: no check).
        max_aspect: Images need an aspect ratio of at most this (0: no check).
        embeddings: An embeddings folder of the same data (``lipkit embed``), for scores and semantic dedup.
        min_score: Keep samples whose image-text score is at least this.
        top_fraction: Keep this fraction of the samples with the best image-text scores.
        dedup: Duplicate finders to run, from :data:`DEDUP_KINDS`.
        near_distance: Near duplicates: the largest Hamming distance between perceptual hashes.
        semantic_threshold: Semantic duplicates: the smallest cosine similarity.
        semantic_clusters: Semantic duplicates: k-means clusters (``None``: one per 2,000 samples).
        write: ``keys`` (a key list) or ``shards`` (also new shards in ``out/shards``).
        samples_per_shard: Shards: samples per shard.
        seed: Seed of balancing's coins and of k-means.
        batch_size: Samples per batch handed to the runner.
        limit: Curate only the first ``limit`` samples of the spec.
    """

    data: str
    out: str
    metadata: tuple[str, ...] = ("wordnet", "unigrams", "bigrams")
    min_count: int = 5
    min_bigram_count: int = 3
    min_pmi: float = 5.0
    balance: float | None = None
    keep_unmatched: bool = False
    min_words: int = 3
    min_chars: int = 6
    min_side: int = 200
    max_aspect: float = 3.0
    embeddings: str | None = None
    min_score: float | None = None
    top_fraction: float | None = None
    dedup: tuple[str, ...] = ("exact", "near")
    near_distance: int = 4
    semantic_threshold: float = 0.94
    semantic_clusters: int | None = None
    write: str = "keys"
    samples_per_shard: int = 10_000
    seed: int = 0
    batch_size: int = 256
    limit: int | None = None

    def check(self) -> None:
        """Raises CurationError on a setting out of range or settings that do not go together."""
        unknown = [d for d in self.dedup if d not in DEDUP_KINDS]
        if unknown:
            raise CurationError(f"unknown dedup kind {unknown[0]!r}; choose from {', '.join(DEDUP_KINDS)}")
        if self.write not in WRITE_KINDS:
            raise CurationError(f"--write must be one of {', '.join(WRITE_KINDS)}, got {self.write!r}")
        if self.min_score is not None and self.top_fraction is not None:
            raise CurationError("give a minimum score or a top fraction, not both")
        needs = self.min_score is not None or self.top_fraction is not None or "semantic" in self.dedup
        if needs and not self.embeddings:
            raise CurationError("image-text scores and semantic dedup need --embeddings DIR (made by `lipkit embed`)")
        if self.top_fraction is not None and not 0 < self.top_fraction <= 1:
            raise CurationError(f"the top fraction must be in (0, 1], got {self.top_fraction}")
        if self.balance is not None and not self.metadata:
            raise CurationError("balancing needs metadata (--metadata wordnet,unigrams,bigrams or a list file)")
        if not 0 <= self.near_distance < 64:
            raise CurationError(f"the near-duplicate distance must be in [0, 63] bits, got {self.near_distance}")
        for name in ("batch_size", "samples_per_shard"):
            if getattr(self, name) < 1:
                raise CurationError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.limit is not None and self.limit < 1:
            raise CurationError(f"--limit must be at least 1, got {self.limit}")


@dataclass
class CurateResult:
    """What a curation did.

    Attributes:
        out: The output folder.
        total: Samples of the input.
        kept: Samples kept.
        dropped: Samples dropped, by stage (in stage order).
        caption_fallbacks: Captions that were not UTF-8 (read as Windows-1252; kept).
        source_skipped: Samples the sources left out when opened (no caption, truncated shards...), by reason.
        entries: Metadata entries matched against.
        shards: What packing the shards did (``write="shards"``).
        seconds: Wall time.
    """

    out: Path
    total: int
    kept: int
    dropped: dict[str, int]
    caption_fallbacks: int = 0
    source_skipped: dict[str, int] = field(default_factory=dict)
    entries: int = 0
    shards: PackResult | None = None
    seconds: float = 0.0


@dataclass
class Rows:
    """The samples as the pipeline sees them: read facts, verdicts, and what later steps add."""

    keys: list[str]
    read: dict[str, np.ndarray]
    ledger: Ledger
    vectors: dict[str, np.ndarray] = field(default_factory=dict)
    scores: np.ndarray | None = None
    matches: list[list[int]] | None = None
    keep_probability: np.ndarray | None = None


def config_dict(config: CurateConfig) -> dict[str, Any]:
    """The settings as JSON values (what ``curation.json`` holds under ``config``)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}

"""Metadata for MetaCLIP balancing: the entries captions are matched against, and where each came from.

Sources, combined in the order given (the first source to give an entry names its origin):

* ``wordnet``: every lemma of WordNet (the Debian package ``wordnet-base``, read offline).
* ``unigrams``: words of the corpus's own captions seen at least ``min_count`` times.
* ``bigrams``: adjacent word pairs seen at least ``min_bigram_count`` times whose pointwise mutual information
  ``log2(c(a b) * N / (c(a) * c(b)))`` (``N`` words in all) is at least ``min_pmi`` bits.
* a file: a user list, one entry per line (UTF-8).

MetaCLIP mines Wikipedia with a count of 100 and a PMI of 30, at billions of words; the defaults here
(5 and 3 occurrences, 5 bits) suit corpora of thousands of captions. Words and word pairs are tokens of
:func:`lipkit.data.curation.text.tokens`; punctuation and symbols are never mined, and a bigram never spans one.
Every entry is normalised with :func:`~lipkit.data.curation.text.normalise_entry` and appears once.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import regex

from lipkit.data.curation import CurationError
from lipkit.data.curation.text import normalise_entry, words
from lipkit.data.wordnet import WORDNET_PARTS, WORDNET_ROOT, lemma_text, synsets
from lipkit.errors import LipkitError, suggest
from lipkit.registry import Registry
from lipkit.utils import atomic_write_text

ORIGINS = ("wordnet", "unigram", "bigram", "user")
_ADJ_MARKER = regex.compile(r"\((?:a|p|ip)\)$")  # data.adj's syntactic markers: galore(ip), outback(a)


@dataclass(frozen=True)
class Metadata:
    """Metadata entries (normalised, unique) and each one's origin (``wordnet``, ``unigram``, ``bigram``, ``user``).

    An entry's id is its position in ``entries``.
    """

    entries: list[str]
    origins: list[str]

    def __post_init__(self) -> None:
        if not self.entries:
            raise CurationError("the metadata list is empty: no source gave an entry, so no caption can match")
        if len(self.entries) != len(self.origins):
            raise CurationError(f"{len(self.entries)} metadata entries but {len(self.origins)} origins")
        if len(set(self.entries)) != len(self.entries):
            raise CurationError("metadata entries must be unique")

    def __len__(self) -> int:
        return len(self.entries)

    def by_origin(self) -> dict[str, int]:
        """How many entries each origin gave."""
        return dict(Counter(self.origins))

    def save(self, path: str | Path) -> None:
        """Write ``ENTRY<TAB>ORIGIN`` lines (UTF-8), atomically."""
        atomic_write_text(Path(path), "".join(f"{e}\t{o}\n" for e, o in zip(self.entries, self.origins)))

    @classmethod
    def load(cls, path: str | Path) -> Metadata:
        """Read what :meth:`save` wrote."""
        rows = [line.split("\t") for line in _read_lines(Path(path))]
        if any(len(row) != 2 or row[1] not in ORIGINS for row in rows):
            raise CurationError(f"{path}: not a metadata file (each line must be ENTRY<TAB>ORIGIN)")
        return cls([row[0] for row in rows], [row[1] for row in rows])


@functools.lru_cache(maxsize=2)
def _wordnet(root: Path) -> tuple[str, ...]:
    found: dict[str, None] = {}
    for part in WORDNET_PARTS:
        try:
            for synset in synsets(part, root):
                for lemma in synset.lemmas:
                    found[normalise_entry(lemma_text(_ADJ_MARKER.sub("", lemma)))] = None
        except LipkitError as exc:  # unreadable: the message names the file and the package
            raise CurationError(str(exc)) from None
    found.pop("", None)
    return tuple(sorted(found))


def wordnet_lemmas(root: str | Path = WORDNET_ROOT) -> list[str]:
    """Every lemma of WordNet's ``data.{noun,verb,adj,adv}`` under ``root``, normalised, unique and sorted.

    Underscores become spaces (``hot_dog`` -> ``hot dog``) and the adjective markers (``(a)``, ``(p)``,
    ``(ip)``) are dropped. Read offline; cached per ``root``.
    """
    return list(_wordnet(Path(root)))


@dataclass
class NgramCounts:
    """Word and adjacent-word-pair counts of a caption set (punctuation and symbols are not words)."""

    unigrams: Counter[str] = field(default_factory=Counter)
    bigrams: Counter[tuple[str, str]] = field(default_factory=Counter)
    total: int = 0  # the number of words

    def add(self, caption: str) -> None:
        """Count one caption's words and adjacent word pairs."""
        seq = words(caption)
        found = [w for w in seq if w is not None]
        self.unigrams.update(found)
        self.total += len(found)
        self.bigrams.update([(a, b) for a, b in itertools.pairwise(seq) if a is not None and b is not None])

    def pmi(self, a: str, b: str) -> float:
        """Pointwise mutual information of the pair ``a b`` in bits: ``log2(c(a b) * N / (c(a) * c(b)))``."""
        return math.log2(self.bigrams[(a, b)] * self.total / (self.unigrams[a] * self.unigrams[b]))


def count_ngrams(captions: Iterable[str]) -> NgramCounts:
    """The :class:`NgramCounts` of ``captions``."""
    counts = NgramCounts()
    for caption in captions:
        counts.add(caption)
    return counts


def mine_unigrams(counts: NgramCounts, min_count: int = 5) -> list[str]:
    """The words seen at least ``min_count`` times, sorted."""
    return sorted(w for w, c in counts.unigrams.items() if c >= min_count)


def mine_bigrams(counts: NgramCounts, min_count: int = 3, min_pmi: float = 5.0) -> list[str]:
    """The adjacent word pairs seen at least ``min_count`` times with PMI at least ``min_pmi`` bits, sorted."""
    return sorted(f"{a} {b}" for (a, b), c in counts.bigrams.items() if c >= min_count and counts.pmi(a, b) >= min_pmi)


def mine_ngrams(
    captions: Iterable[str], min_count: int = 5, min_pmi: float = 5.0, min_bigram_count: int = 3
) -> list[str]:
    """Unigrams seen at least ``min_count`` times, then bigrams that pass ``min_bigram_count`` and ``min_pmi``."""
    counts = count_ngrams(captions)
    return mine_unigrams(counts, min_count) + mine_bigrams(counts, min_bigram_count, min_pmi)


def _read_lines(path: Path) -> list[str]:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CurationError(f"cannot read the metadata list {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CurationError(f"{path}: line {line} is not UTF-8 (byte {exc.start}); save the list as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_entries(path: str | Path) -> list[str]:
    """A user's entries, one per line (UTF-8), normalised; blank lines are skipped, repeats kept once."""
    found = {normalise_entry(line): None for line in _read_lines(Path(path))}
    found.pop("", None)
    return list(found)


@dataclass(frozen=True)
class _Inputs:
    captions: Sequence[str] | None
    wordnet_root: Path
    min_count: int
    min_bigram_count: int
    min_pmi: float

    @functools.cached_property
    def counts(self) -> NgramCounts:
        if self.captions is None:
            raise CurationError("mining unigrams or bigrams needs the corpus's captions")
        return count_ngrams(self.captions)


# a named source: its origin, and its entries from the build's inputs
SOURCES: Registry[tuple[str, Callable[[_Inputs], list[str]]]] = Registry("metadata source")
SOURCES.add("wordnet", ("wordnet", lambda inputs: wordnet_lemmas(inputs.wordnet_root)))
SOURCES.add("unigrams", ("unigram", lambda inputs: mine_unigrams(inputs.counts, inputs.min_count)))
SOURCES.add("bigrams", ("bigram", lambda inputs: mine_bigrams(inputs.counts, inputs.min_bigram_count, inputs.min_pmi)))


def build_metadata(
    sources: Sequence[str | Path] = ("wordnet", "unigrams", "bigrams"),
    captions: Iterable[str] | None = None,
    wordnet_root: str | Path = WORDNET_ROOT,
    min_count: int = 5,
    min_bigram_count: int = 3,
    min_pmi: float = 5.0,
) -> Metadata:
    """Combine metadata sources into one :class:`Metadata`.

    Args:
        sources: ``wordnet``, ``unigrams``, ``bigrams`` or the path of a user list, in order; an entry given by
            several sources keeps the origin of the first.
        captions: The corpus's captions (needed to mine unigrams and bigrams).
        wordnet_root: Where WordNet's ``data.*`` files are.
        min_count: Unigrams: the fewest occurrences.
        min_bigram_count: Bigrams: the fewest occurrences.
        min_pmi: Bigrams: the lowest PMI, in bits.

    Raises:
        CurationError: An unknown source, an unreadable list, or no entries at all.
    """
    inputs = _Inputs(
        None if captions is None else list(captions), Path(wordnet_root), min_count, min_bigram_count, min_pmi
    )
    origin_of: dict[str, str] = {}
    for source in sources:
        origin, entries = _entries_of(source, inputs)
        for entry in entries:
            origin_of.setdefault(entry, origin)
    if not origin_of:
        raise CurationError(
            f"the metadata list is empty: sources {', '.join(map(str, sources)) or '(none)'} gave no entries"
        )
    return Metadata(list(origin_of), list(origin_of.values()))


def _entries_of(source: str | Path, inputs: _Inputs) -> tuple[str, list[str]]:
    if isinstance(source, str) and source in SOURCES:
        origin, read = SOURCES.get(source)
        return origin, read(inputs)
    if Path(source).is_file():
        return "user", read_entries(source)
    raise CurationError(
        f"metadata source {str(source)!r} is neither {', '.join(SOURCES.names())} nor a file."
        + suggest(str(source), SOURCES.names())
    )

"""Metadata sources: WordNet read offline, n-grams mined with counts and PMI computed by hand, user lists."""

from __future__ import annotations

import math

import pytest

from lipkit.data.curation import CurationError
from lipkit.data.curation.metadata import (
    Metadata,
    build_metadata,
    count_ngrams,
    mine_bigrams,
    mine_ngrams,
    mine_unigrams,
    read_entries,
    wordnet_lemmas,
)
from lipkit.data.curation.text import normalise_entry

# words: hot x5, dog x4, a x2, sun x1, day x1 (N = 13); pairs: hot dog x3, hot sun, a dog, a hot, hot day.
# "dog ," and ", hot" are not pairs: punctuation is not a word and no pair spans it.
CAPTIONS = ["hot dog", "Hot dog, hot sun", "a dog", "a HOT day", "hot dog!"]


def test_wordnet_gives_every_lemma_normalised():
    lemmas = wordnet_lemmas()
    assert len(lemmas) > 140_000 and lemmas == sorted(set(lemmas))
    known = {"dog", "hot dog", normalise_entry("T-shirt"), "galore", "outback", "einstein", "run"}
    assert known <= set(lemmas)  # underscores are spaces; "galore(ip)" and "outback(a)" lose their markers
    assert not any("_" in lemma or lemma.endswith(")") for lemma in lemmas if lemma != ")")
    assert all(lemma == normalise_entry(lemma) for lemma in lemmas)


def test_missing_wordnet_is_a_clear_error(tmp_path):
    with pytest.raises(CurationError, match=r"data\.noun.*apt-get install wordnet-base"):
        wordnet_lemmas(tmp_path)


def test_ngram_counts_by_hand():
    counts = count_ngrams(CAPTIONS)
    assert counts.unigrams == {"hot": 5, "dog": 4, "a": 2, "sun": 1, "day": 1}
    assert counts.total == 13
    assert counts.bigrams == {("hot", "dog"): 3, ("hot", "sun"): 1, ("a", "dog"): 1, ("a", "hot"): 1, ("hot", "day"): 1}
    assert counts.pmi("hot", "dog") == math.log2(3 * 13 / (5 * 4))  # 0.963 bits
    assert counts.pmi("hot", "sun") == math.log2(1 * 13 / (5 * 1))  # 1.379
    assert counts.pmi("a", "dog") == math.log2(13 / (2 * 4))  # 0.700
    assert counts.pmi("a", "hot") == math.log2(13 / (2 * 5))  # 0.379


def test_mining_thresholds_by_hand():
    counts = count_ngrams(CAPTIONS)
    assert mine_unigrams(counts, min_count=1) == ["a", "day", "dog", "hot", "sun"]  # no "," or "!"
    assert mine_unigrams(counts, min_count=2) == ["a", "dog", "hot"]
    assert mine_unigrams(counts, min_count=5) == ["hot"]
    assert mine_bigrams(counts, min_count=1, min_pmi=1.0) == ["hot day", "hot sun"]
    assert mine_bigrams(counts, min_count=1, min_pmi=0.5) == ["a dog", "hot day", "hot dog", "hot sun"]
    assert mine_bigrams(counts, min_count=2, min_pmi=0.96) == ["hot dog"]
    assert mine_bigrams(counts, min_count=2, min_pmi=0.97) == []
    assert mine_ngrams(CAPTIONS, min_count=4, min_pmi=0.9, min_bigram_count=2) == ["dog", "hot", "hot dog"]


def test_user_lists(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes("\ufeffHot Dog\n\n  café au lait \nhot   dog\nT-shirt\r\n".encode())
    assert read_entries(path) == ["hot dog", "café au lait", "t - shirt"]
    path.write_bytes(b"dog\ncaf\xe9\n")  # Latin-1
    with pytest.raises(CurationError, match=r"list\.txt: line 2 is not UTF-8"):
        read_entries(path)
    with pytest.raises(CurationError, match="cannot read the metadata list"):
        read_entries(tmp_path / "missing.txt")


def test_build_metadata_keeps_the_first_origin(tmp_path):
    user = tmp_path / "mine.txt"
    user.write_text("hot dog\nzorbly hat\n")
    meta = build_metadata(("unigrams", "bigrams", user), CAPTIONS, min_count=2, min_bigram_count=2, min_pmi=0.9)
    assert meta.entries == ["a", "dog", "hot", "hot dog", "zorbly hat"]
    assert meta.origins == ["unigram", "unigram", "unigram", "bigram", "user"]
    assert meta.by_origin() == {"unigram": 3, "bigram": 1, "user": 1}
    meta.save(tmp_path / "meta.tsv")
    assert Metadata.load(tmp_path / "meta.tsv") == meta
    full = build_metadata(("wordnet", user))
    assert len(full) > 140_000 and full.origins[full.entries.index("zorbly hat")] == "user"
    assert full.origins[full.entries.index("hot dog")] == "wordnet"


def test_empty_or_unknown_sources_are_errors(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(CurationError, match="metadata list is empty"):
        build_metadata((empty,))
    with pytest.raises(CurationError, match="metadata list is empty"):
        build_metadata(("unigrams",), CAPTIONS, min_count=99)
    with pytest.raises(CurationError, match="Did you mean: wordnet"):
        build_metadata(("wordnte",))
    with pytest.raises(CurationError, match="needs the corpus's captions"):
        build_metadata(("bigrams",))
    with pytest.raises(CurationError, match="empty"):
        Metadata([], [])

"""The Aho-Corasick matcher returns exactly MetaCLIP's plain definition: " entry " in the normalised caption."""

from __future__ import annotations

import pickle
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipkit.data.builtin import OPENCLIPART_SVG, svg_metadata
from lipkit.data.corpora import _EMOJI_RANGES, tuxpaint_captions, tuxpaint_stamps
from lipkit.data.curation import CurationError
from lipkit.data.curation.match import Matcher, padded_entries, plain_match
from lipkit.data.curation.metadata import mine_ngrams, wordnet_lemmas
from lipkit.data.curation.text import normalise


def real_captions() -> list[str]:
    """Captions of the built-in corpora, read without rendering an image.

    Tux Paint's stamps in every language they are translated into, the Unicode names of the symbol code
    points the emoji corpus draws from, and the titles of every 16th OpenClipart drawing (parsing all 8,000
    SVGs takes too long for a test).
    """
    tux = sorted({c for png in tuxpaint_stamps() for c in tuxpaint_captions(png.with_suffix(".txt"))[0].values()})
    emoji = [
        unicodedata.name(chr(cp)).lower()
        for lo, hi in _EMOJI_RANGES
        for cp in range(lo, hi)
        if unicodedata.category(chr(cp)) == "So"
    ]
    clipart = [svg_metadata(svg)[0] for svg in sorted(OPENCLIPART_SVG.rglob("*.svg"))[::16]]
    return tux + emoji + [title for title in clipart if title]


@pytest.fixture(scope="module")
def corpus() -> tuple[list[str], list[str], Matcher]:
    captions = real_captions()
    mined = mine_ngrams(captions, min_count=3, min_pmi=3.0, min_bigram_count=2)
    entries = sorted(set(wordnet_lemmas()) | set(mined))
    return captions, entries, Matcher(entries)


def plain_matches(entries: list[str], captions: list[str]) -> list[list[int]]:
    """The plain definition for many captions at once, entry by entry.

    Normalised captions and padded entries hold no newline, so a padded entry occurs in the captions joined
    by newlines exactly when it occurs in one of them; only those entries are then looked for caption by
    caption.
    """
    texts = [normalise(c) for c in captions]
    joined = "\n".join(texts)
    found: list[list[int]] = [[] for _ in texts]
    for i, entry in enumerate(padded_entries(entries)):
        if entry in joined:
            for j, text in enumerate(texts):
                if entry in text:
                    found[j].append(i)
    return found


def first_token_matches(entries: list[str], captions: list[str]) -> list[list[int]]:
    """The plain definition, looking in each caption only for the entries whose first token it holds.

    A normalised caption is its tokens between single spaces, so ``" e1 e2 ... "`` occurs in it only if
    ``" e1 "`` does, that is only if ``e1`` is one of its tokens: the entries left out cannot match.
    """
    padded = padded_entries(entries)
    by_first: dict[str, list[int]] = {}
    for i, entry in enumerate(padded):
        by_first.setdefault(entry.split(" ", 2)[1], []).append(i)
    found = []
    for text in map(normalise, captions):
        candidates = sorted(i for token in set(text.split()) for i in by_first.get(token, ()))
        found.append([i for i in candidates if padded[i] in text])
    return found


def test_matcher_equals_the_plain_definition_on_real_captions(corpus):
    captions, entries, matcher = corpus
    assert len(captions) > 40_000 and len(entries) > 150_000
    sample = captions[::60]  # every corpus and language; every entry is tried on each caption
    assert len(sample) > 700
    assert matcher.match_batch(sample) == plain_matches(entries, sample)
    got = matcher.match_batch(captions)
    assert got == first_token_matches(entries, captions)
    assert sum(map(len, got)) > 150_000  # real matches, not empty lists that agree
    assert sum(1 for ids in got if ids) > 30_000


def test_matcher_on_a_known_caption(corpus):
    _, entries, matcher = corpus
    ids = matcher.match("A hot dog and a T-shirt, please!")
    assert {"hot dog", "t - shirt", "dog", "shirt"} <= {entries[i] for i in ids}
    assert "hot - dog" not in {entries[i] for i in ids}


def test_a_matcher_pickles_with_its_automaton():
    small = Matcher(["dog", "hot dog", "T-shirt", "dog"])  # two entries that are the same both match
    again = pickle.loads(pickle.dumps(small))
    assert again.match("HOT DOG in a t - shirt") == [0, 1, 2, 3] == small.match("HOT DOG in a t - shirt")
    assert again.entries == small.entries and len(again) == 4


def test_matcher_examples():
    matcher = Matcher(["dog", "hot dog", "dog's", "c++", "new york", "york"])
    assert matcher.match("Hot Dogs") == []  # whole tokens only
    assert matcher.match("My dog's bowl") == [0, 2]  # "dog ' s": both "dog" and "dog's"
    assert matcher.match("I love C++!") == [3]
    assert matcher.match("new\n\tYORK,new york") == [4, 5]  # each entry once
    assert matcher.match("") == []


def test_blank_or_missing_entries_are_errors():
    with pytest.raises(CurationError, match="empty"):
        Matcher([])
    with pytest.raises(CurationError, match=r"entry 1 \(' \\t '\) is blank"):
        Matcher(["dog", " \t "])
    with pytest.raises(CurationError, match="blank"):
        plain_match(["", "dog"], "dog")


# letters that case-fold to more than one, combining marks, wide and odd spaces, emoji with a modifier
ODD = ["\u0301", "\u00a0", "\u2003", "\u200b", "\u200d", "\ufe0f", "\x1f"]
ALPHABET = st.sampled_from([*"abcAB  \t\n.,!?'-_()/\"ßẞİıé日本ﬁ👍🏽#$+°", *ODD])
WORDS = st.text(ALPHABET, min_size=1, max_size=12)


@given(entries=st.lists(WORDS, min_size=1, max_size=12), glue=st.lists(WORDS, max_size=12), data=st.data())
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
def test_matcher_equals_the_plain_definition_on_generated_text(entries, glue, data):
    entries = [e for e in entries if normalise(e).strip()]
    if not entries:
        return
    # a caption made of entries and other text, so that matches happen
    parts = data.draw(st.permutations(entries + glue))
    caption = data.draw(st.sampled_from([" ", "", ",", "\t", "-"])).join(parts)
    matcher = Matcher(entries)
    assert matcher.match(caption) == plain_match(entries, caption)
    captions = [caption, caption.upper()]
    assert matcher.match_batch(captions) == [plain_match(entries, c) for c in captions]

"""Caption normalisation: case folding, punctuation split off, single spaces, padding; idempotent."""

from __future__ import annotations

import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lipkit.data.curation.text import normalise, normalise_entry, tokens, words


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("A Hot-Dog, please!", " a hot - dog , please ! "),
        ("  two\t\n spaces\u00a0\u2003here\x1f\x00too ", " two spaces here too "),
        ("STRASSE Straße", " strasse strasse "),  # case folding, not lower(): ß folds to ss
        ("dog's (big) bowl...", " dog ' s ( big ) bowl . . . "),
        ("C++ & $5", " c + + & $ 5 "),  # symbols are tokens too
        ("I❤️NY 👍🏽", " i ❤\ufe0f ny 👍 🏽 "),  # a symbol keeps its variation selector; the skin tone is a symbol
        ("", "  "),
    ],
)
def test_normalise_examples(caption, expected):
    assert normalise(caption) == expected


def test_entries_are_normalised_without_padding():
    assert normalise_entry("T-shirt") == "t - shirt"
    assert normalise_entry("  Hot   DOG ") == "hot dog"
    assert normalise_entry(" \t") == ""
    assert tokens("New-York!") == ["new", "-", "york", "!"]
    assert words("New-York!") == ["new", None, "york", None]


@given(st.text() | st.text(st.characters(codec="utf-8", categories=["Cc", "Z", "P", "S", "M", "Ll"])))
@settings(max_examples=500, deadline=None)
def test_normalising_is_idempotent_and_tokenwise(text):
    normal = normalise(text)
    assert normalise(normal) == normal
    assert normalise_entry(normalise_entry(text)) == normalise_entry(text)
    assert normal == f" {normalise_entry(text)} "
    words = tokens(text)
    assert normal == " " + " ".join(words) + " "
    assert all(word and not any(c.isspace() or unicodedata.category(c) == "Cc" for c in word) for word in words)


def test_normalise_equals_the_joined_tokens_for_every_assigned_code_point():
    # each code point after a letter, after a symbol, alone and before a combining mark (private-use and
    # unassigned code points all behave alike: a few of them stand for the rest)
    kinds = {cp: unicodedata.category(chr(cp)) for cp in range(0x110000)}
    chars = [chr(cp) for cp, kind in kinds.items() if kind not in ("Cs", "Co", "Cn") or cp % 4099 == 0]
    for start in range(0, len(chars), 4096):
        text = "".join(f"a{c}b!{c} {c}\u0301 " for c in chars[start : start + 4096])
        assert normalise(text) == " " + " ".join(tokens(text)) + " "

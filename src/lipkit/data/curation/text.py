"""Caption normalisation for metadata matching (MetaCLIP's substring semantics, made exact).

A caption is case-folded, every punctuation or symbol character (Unicode categories P and S, with any
combining marks after it, such as an emoji's variation selector) becomes a token of its own, runs of whitespace
and control characters become one space, and the result is padded with one space at each end:
``"A Hot-Dog, please!"`` -> ``" a hot - dog , please ! "``. An entry is normalised the same way without the
padding, so entry ``"hot-dog"`` is ``"hot - dog"``, and it matches a caption when ``" " + entry + " "`` occurs
in the normalised caption: it covers whole tokens only (``"dog"`` matches ``"hot dog"`` and ``"dog's"``, not
``"dogs"``). Normalising is idempotent, so entries that are already normalised stay as they are.
"""

from __future__ import annotations

import regex

_SYMBOL = r"[\p{P}\p{S}]\p{M}*"  # a punctuation or symbol character and its combining marks
_WORD = r"[^\s\p{Cc}\p{P}\p{S}]+"  # a run of anything else but whitespace and control characters
_TOKEN = regex.compile(f"{_SYMBOL}|{_WORD}")
_SYMBOL_OR_WORD = regex.compile(f"({_SYMBOL})|({_WORD})")
_SYMBOLS = regex.compile(_SYMBOL)
_CONTROLS = regex.compile(r"\p{Cc}")


def tokens(text: str) -> list[str]:
    """The tokens of ``text`` after case folding: single punctuation or symbol characters and the runs between."""
    return _TOKEN.findall(text.casefold())


def words(text: str) -> list[str | None]:
    """:func:`tokens`, with ``None`` in place of each punctuation or symbol token."""
    return [word or None for _, word in _SYMBOL_OR_WORD.findall(text.casefold())]


def normalise(caption: str) -> str:
    """``caption`` case-folded, punctuation split off, single spaces, one space of padding at each end.

    The same as ``" " + " ".join(tokens(caption)) + " "``, done faster: symbols are padded with spaces and the
    text is split at Python's whitespace, which holds the Unicode White_Space characters and, once control
    characters are spaces, nothing more.
    """
    text = caption.casefold()
    if not text.isprintable():  # tabs, line breaks, odd spaces or control characters
        text = _CONTROLS.sub(" ", text)
    return " " + " ".join(_SYMBOLS.sub(r" \g<0> ", text).split()) + " "


def normalise_entry(entry: str) -> str:
    """A metadata entry normalised like a caption, without the padding (empty when it has no tokens)."""
    return " ".join(tokens(entry))

"""Metadata matching: which entries occur in a caption, in one Aho-Corasick pass (``pyahocorasick``).

An entry matches a caption when ``" " + normalise_entry(entry) + " "`` occurs in ``normalise(caption)``
(:mod:`lipkit.data.curation.text`): MetaCLIP's definition, which :func:`plain_match` tests entry by entry.
:class:`Matcher` puts every padded entry into one automaton and reads each caption once, so its cost grows
with the caption's length and its matches, not with the number of entries; it returns exactly what
:func:`plain_match` returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lipkit.data.curation import CurationError
from lipkit.data.curation.text import normalise, normalise_entry


def padded_entries(entries: Iterable[str]) -> list[str]:
    """``" entry "`` for each entry, normalised; an entry without tokens (blank, or empty) is an error."""
    padded = []
    for i, entry in enumerate(entries):
        normal = normalise_entry(entry)
        if not normal:
            raise CurationError(f"metadata entry {i} ({entry!r}) is blank after normalisation")
        padded.append(f" {normal} ")
    if not padded:
        raise CurationError("the metadata list is empty: nothing can match")
    return padded


def plain_match(entries: Sequence[str], caption: str) -> list[int]:
    """The reference: the ids of the entries whose padded form occurs in the normalised caption, one by one."""
    text = normalise(caption)
    return [i for i, entry in enumerate(padded_entries(entries)) if entry in text]


class Matcher:
    """Matches captions against metadata entries with one Aho-Corasick automaton.

    A matcher pickles with its automaton (faster than building it again in each worker).

    Args:
        entries: The metadata entries; they are normalised with
            :func:`~lipkit.data.curation.text.normalise_entry`, and two that normalise alike both match.

    Raises:
        CurationError: No entries, an entry that is blank after normalisation, or no ``pyahocorasick``.
    """

    def __init__(self, entries: Sequence[str]) -> None:
        try:
            import ahocorasick
        except ImportError:
            raise CurationError("metadata matching needs `pip install 'lipkit[curate]'` (pyahocorasick)") from None
        self.entries = list(entries)
        first: dict[str, int] = {}
        self._also: dict[int, list[int]] = {}  # entries that normalise like an earlier one, by its id
        self._automaton = ahocorasick.Automaton(ahocorasick.STORE_INTS)
        for i, padded in enumerate(padded_entries(self.entries)):
            if padded in first:
                self._also.setdefault(first[padded], []).append(i)
            else:
                first[padded] = i
                self._automaton.add_word(padded, i)
        self._automaton.make_automaton()

    def __len__(self) -> int:
        return len(self.entries)

    def __getstate__(self) -> dict[str, Any]:
        return {"entries": self.entries, "also": self._also, "automaton": self._automaton}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.entries, self._also, self._automaton = state["entries"], state["also"], state["automaton"]

    def match(self, caption: str) -> list[int]:
        """The ids of the entries that occur in ``caption``, ascending, each once."""
        found = {i for _, i in self._automaton.iter(normalise(caption))}
        if self._also:
            found.update(j for i in found.intersection(self._also) for j in self._also[i])
        return sorted(found)

    def match_batch(self, captions: Iterable[str]) -> list[list[int]]:
        """:meth:`match` for each caption."""
        return [self.match(caption) for caption in captions]

"""WordNet's database files, read offline (the Debian package ``wordnet-base`` installs them).

Each ``data.{noun,verb,adj,adv}`` file holds one synset per line: its byte offset (the synset's id,
``02963159``), its lemmas, then its pointers to other synsets (``@`` a hypernym, ``@i`` an instance
hypernym, ...), then ``| gloss``. ImageNet names its classes by noun synset (``n03594734``: "jean, blue
jean, denim"), so a class's hypernyms are one lookup away: jean -> trouser, sweatshirt -> pullover,
running shoe -> shoe.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from lipkit.errors import LipkitError

WORDNET_ROOT = Path("/usr/share/wordnet")
WORDNET_PARTS = ("noun", "verb", "adj", "adv")
HYPERNYM_POINTERS = ("@", "@i")  # hypernym, instance hypernym


@dataclass(frozen=True)
class Synset:
    """One line of a WordNet data file: ``offset``, its lemmas as written (``blue_jean``, ``slipover``,
    adjectives with their ``(a)`` markers) and the offsets of its noun hypernyms."""

    offset: str
    lemmas: tuple[str, ...]
    hypernyms: tuple[str, ...]


def synsets(part: str, root: str | Path = WORDNET_ROOT) -> Iterator[Synset]:
    """Every synset of ``data.{part}`` under ``root``, in file order.

    Raises:
        LipkitError: The file cannot be read (with the command that installs it), or a line is not in
            WordNet's data-file layout (with its number).
    """
    path = Path(root) / f"data.{part}"
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LipkitError(
            f"cannot read WordNet's {path} ({exc}); install it with `apt-get install wordnet-base`"
        ) from None
    for number, line in enumerate(lines, 1):
        if not line or line.startswith("  "):  # lines starting with two spaces are the licence
            continue
        fields = line.split(" | ", 1)[0].split(" ")
        try:
            n_words = int(fields[3], 16)
            lemmas = tuple(fields[4 : 4 + 2 * n_words : 2])
            at = 4 + 2 * n_words  # pointer count, then (symbol, offset, part of speech, source/target) each
            pointers = [fields[at + 1 + 4 * i : at + 5 + 4 * i] for i in range(int(fields[at]))]
            hypernyms = tuple(o for symbol, o, pos, _ in pointers if symbol in HYPERNYM_POINTERS and pos == "n")
        except (IndexError, ValueError):  # a count that is no number, or fields cut short
            raise LipkitError(f"{path}:{number}: not a WordNet data line: {line[:80]!r}") from None
        yield Synset(fields[0], lemmas, hypernyms)


@functools.lru_cache(maxsize=2)
def _nouns(root: Path) -> dict[str, Synset]:
    return {s.offset: s for s in synsets("noun", root)}


def lemma_text(lemma: str) -> str:
    """A lemma as words: ``blue_jean`` -> ``blue jean``."""
    return lemma.replace("_", " ")


def noun_hypernyms(wnids: Sequence[str], root: str | Path = WORDNET_ROOT) -> list[list[str]]:
    """The direct hypernyms of each noun synset in ``wnids`` (ImageNet's ``n03594734`` form), each by its
    first lemma: ``["n03594734"]`` -> ``[["trouser", "workwear"]]``.

    Raises:
        LipkitError: WordNet is missing, or an id is not a noun synset of it.
    """
    nouns = _nouns(Path(root))
    out = []
    for wnid in wnids:
        synset = nouns.get(wnid.removeprefix("n"))
        if synset is None or not wnid.startswith("n"):
            raise LipkitError(f"{wnid!r} is not a noun synset of WordNet ({Path(root)}/data.noun)")
        names = [lemma_text(nouns[h].lemmas[0]) for h in synset.hypernyms if h in nouns]
        out.append(list(dict.fromkeys(names)))
    return out

"""The WordNet reader: synsets and hypernyms from the database files (a written sample and the installed ones)."""

from __future__ import annotations

import pytest

from lipkit.data.wordnet import Synset, noun_hypernyms, synsets
from lipkit.errors import LipkitError

# two synsets in WordNet's data-file layout (offset, lexfile, type, hex word count, words with lex ids,
# pointer count, pointers, gloss), after a licence line that starts with two spaces
SAMPLE = (
    "  1 This software and database is being provided to you, the LICENSEE, by Princeton University\n"
    "00000010 06 n 02 trouser 0 pant 0 002 @ 00000020 n 0000 ~ 00000030 n 0000 | (usually in plural) a garment\n"
    "00000020 06 n 01 garment 0 001 ~ 00000010 n 0000 | an article of clothing\n"
    "00000030 06 n 03 blue_jean 0 jean 0 denim 0 002 @ 00000010 n 0000 @i 00000020 n 0000 | close-fitting trousers\n"
)


def test_synsets_parse_lemmas_and_hypernym_pointers(tmp_path):
    (tmp_path / "data.noun").write_text(SAMPLE)
    assert list(synsets("noun", tmp_path)) == [
        Synset("00000010", ("trouser", "pant"), ("00000020",)),  # the hyponym pointer (~) is not a hypernym
        Synset("00000020", ("garment",), ()),
        Synset("00000030", ("blue_jean", "jean", "denim"), ("00000010", "00000020")),
    ]
    assert noun_hypernyms(["n00000030", "n00000020"], tmp_path) == [["trouser", "garment"], []]


def test_unknown_synsets_and_missing_files_are_clear_errors(tmp_path):
    (tmp_path / "data.noun").write_text(SAMPLE)
    with pytest.raises(LipkitError, match="'n00000099' is not a noun synset"):
        noun_hypernyms(["n00000099"], tmp_path)
    with pytest.raises(LipkitError, match="apt-get install wordnet-base"):
        list(synsets("verb", tmp_path))
    (tmp_path / "data.adj").write_text(SAMPLE.splitlines()[1][:30] + "\n" + "00000040 00 a zz word 0 000 | bad count\n")
    with pytest.raises(LipkitError, match=r"data\.adj:1: not a WordNet data line: '00000010 06 n 02 trouser 0 pan'"):
        list(synsets("adj", tmp_path))
    (tmp_path / "data.adv").write_text("00000040 00 r zz word 0 000 | a word count that is no hex number\n")
    with pytest.raises(LipkitError, match=r"data\.adv:1: not a WordNet data line"):
        list(synsets("adv", tmp_path))


def test_installed_wordnet_puts_imagenet_classes_under_their_broader_names():
    jean, sweatshirt, running_shoe, purse = noun_hypernyms(["n03594734", "n04370456", "n04120489", "n04026417"])
    assert jean == ["trouser", "workwear"]
    assert sweatshirt == ["pullover"]
    assert running_shoe == ["shoe"]
    assert purse == ["bag"]

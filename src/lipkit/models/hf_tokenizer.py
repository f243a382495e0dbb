"""Tokenizer for Hugging Face text towers, loaded from the same local directory as the model."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from lipkit.errors import LipkitError
from lipkit.models.text import resolve_local_path


class HFTokenizer:
    """Wraps ``transformers.AutoTokenizer`` to return ids stacked with the attention mask, (B, 2, T).

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

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.Tensor:
        """Tokenise ``texts`` into a LongTensor (B, 2, T): ids in ``[:, 0]``, attention mask in ``[:, 1]``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        enc = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=context_length or self.context_length,
            return_tensors="pt",
        )
        return torch.stack([enc["input_ids"], enc["attention_mask"]], dim=1).long()

"""Embed a dataset with a model, in batches, with a progress bar: the one loop behind every embedding job."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lipkit.data.loader import Collate, TransformedPairs
from lipkit.data.pairs import PairSource
from lipkit.errors import LipkitError
from lipkit.models import DualEncoder, image_transform
from lipkit.models.factory import batch_tokenizer

# What to keep of one field of a batch (images, tokens, labels...): a tensor of rows on CPU
Column = Callable[[Any], torch.Tensor]


def image_column(model: DualEncoder, device: torch.device | str) -> Column:
    """A column of L2-normalised float32 image embeddings."""
    return lambda images: model.encode_image(images.to(device), normalize=True).float().cpu()


def text_column(model: DualEncoder, device: torch.device | str) -> Column:
    """A column of L2-normalised float32 text embeddings."""
    return lambda tokens: model.encode_text(tokens.to(device), normalize=True).float().cpu()


def keep_column(values: torch.Tensor) -> torch.Tensor:
    """A column kept as the loader gives it (labels, for one)."""
    return values


@torch.no_grad()
def embed_dataset(
    model: DualEncoder,
    dataset: Dataset,
    columns: Sequence[Column],
    batch_size: int,
    workers: int,
    device: torch.device | str,
    progress: bool,
    desc: str = "embedding",
    collate_fn: Callable[[list], Any] | None = None,
) -> list[torch.Tensor]:
    """Load ``dataset`` in batches and turn field ``i`` of every batch into rows with ``columns[i]``.

    Args:
        model: The dual encoder; put in eval mode on ``device`` before the first batch.
        dataset: A map-style dataset whose batches have one field per column.
        columns: One per field, e.g. ``(image_column(model, device), keep_column)``.
        batch_size: Samples per batch.
        workers: Data-loading processes.
        device: Where to run the model.
        progress: Show a progress bar.
        desc: The progress bar's label.
        collate_fn: How to batch samples (default: PyTorch's).

    Returns:
        Each column's rows over the whole dataset, in dataset order.
    """
    if len(dataset) == 0:
        raise LipkitError("the dataset is empty")
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate_fn)
    model.eval().to(device)
    rows: list[list[torch.Tensor]] = [[] for _ in columns]
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        for kept, column, field in zip(rows, columns, batch, strict=True):
            kept.append(column(field))
    return [torch.cat(kept) for kept in rows]


def embed_pairs(
    model: DualEncoder,
    source: PairSource,
    batch_size: int = 128,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and caption embeddings of every pair in ``source``: two (N, D) tensors."""
    images, texts = embed_dataset(
        model,
        TransformedPairs(source, image_transform(model.cfg)),
        (image_column(model, device), text_column(model, device)),
        batch_size,
        workers,
        device,
        progress,
        collate_fn=Collate(batch_tokenizer(model.cfg)),
    )
    return images, texts

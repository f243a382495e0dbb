"""Embed the images and captions of a pair source with a model, in batches, with a progress bar."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from lipkit.data.loader import Collate, TransformedPairs
from lipkit.data.sources import PairSource
from lipkit.models import DualEncoder, image_transform
from lipkit.models.factory import batch_tokenizer


@torch.no_grad()
def embed_pairs(
    model: DualEncoder,
    source: PairSource,
    batch_size: int = 128,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image and caption embeddings of every pair in ``source``: two (N, D) tensors."""
    loader = DataLoader(
        TransformedPairs(source, image_transform(model.cfg)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=Collate(batch_tokenizer(model.cfg)),
    )
    model.eval().to(device)
    images, texts = [], []
    for batch_images, tokens in tqdm(loader, desc="embedding", unit="batch", disable=not progress):
        images.append(model.encode_image(batch_images.to(device), normalize=True).float().cpu())
        texts.append(model.encode_text(tokens.to(device), normalize=True).float().cpu())
    return torch.cat(images), torch.cat(texts)

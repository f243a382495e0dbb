"""Locked-tower (LiT) training on cached features: frozen trunks run once, then only the heads train.

When both towers' trunks are frozen, their outputs for a sample never change, so they are computed
once (with the evaluation transform), saved on disk under a key made of both trunks' weights and
configs, the preprocessing, and the data's keys and captions, and reused by every later run: a re-run
skips straight to training the projection heads, which takes seconds. Batches are drawn by the same
deterministic sampler as image batches, so resuming stays exact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from lipkit.config import to_dict
from lipkit.data.loader import ResumableBatchSampler, TransformedPairs
from lipkit.data.sources import PairSource
from lipkit.data.spec import Mixture
from lipkit.errors import ConfigError
from lipkit.models import DualEncoder, get_tokenizer, image_transform
from lipkit.utils import atomic_write, cache_root, update_digest


def default_cache_dir() -> Path:
    """``$LIPKIT_CACHE_DIR/features``, else ``~/.cache/lipkit/features``."""
    return cache_root() / "features"


def check_lockable(model: DualEncoder) -> None:
    """Feature caching needs both trunks frozen; otherwise their outputs change during training."""
    if not (model.cfg.lock_image and model.cfg.lock_text):
        raise ConfigError(
            "cache_features needs both towers locked: set model_overrides.lock_image=true and "
            "model_overrides.lock_text=true (or use a LiT config such as lit-effnet-minilm)"
        )


HEAD_KEYS = ("proj", "proj_bias")  # the projection heads train; cached trunk features do not depend on them


def cache_key(model: DualEncoder, source: PairSource) -> str:
    """A digest of everything the cached features depend on (trunk weights, configs, data)."""
    h = hashlib.sha256()
    cfg = to_dict(model.cfg)
    towers = [{k: v for k, v in cfg[t].items() if k not in HEAD_KEYS} for t in ("vision", "text")]
    h.update(json.dumps([*towers, cfg["preprocess"], cfg["tokenizer"]], sort_keys=True).encode())
    update_digest(h, model.visual, skip_prefix="proj.")
    update_digest(h, model.text, skip_prefix="proj.")
    for i in range(len(source)):
        h.update(f"{source.key(i)}\t{source.caption(i)}\n".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def _compute(
    model: DualEncoder, source: PairSource, batch_size: int, workers: int, device: torch.device, progress: bool
):
    tokenizer = get_tokenizer(model.cfg)
    loader = DataLoader(
        TransformedPairs(source, image_transform(model.cfg)), batch_size=batch_size, num_workers=workers
    )
    was_training = model.training
    model.eval()
    images, texts = [], []
    for batch_images, captions in tqdm(loader, desc="caching frozen features", unit="batch", disable=not progress):
        images.append(model.visual.features(batch_images.to(device)).float().cpu())
        texts.append(model.text.features(tokenizer(list(captions)).to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(images), torch.cat(texts)


def cached_features(
    model: DualEncoder,
    source: PairSource,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frozen-trunk image and text features (N, F_image) and (N, F_text) of every pair, from disk if cached."""
    check_lockable(model)
    path = Path(cache_dir or default_cache_dir()) / f"{cache_key(model, source)}.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        return saved["image"], saved["text"]
    image, text = _compute(model, source, batch_size, workers, torch.device(device), progress)
    atomic_write(path, lambda f: torch.save({"image": image, "text": text}, f))
    return image, text


class FeaturePairs(Dataset):
    """``(index, seed)`` -> the cached (image feature, text feature) pair."""

    def __init__(self, image: torch.Tensor, text: torch.Tensor) -> None:
        self.image, self.text = image, text

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.tensor([i for i, _ in items])
        return self.image[index], self.text[index]

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.image[item[0]], self.text[item[0]]


def make_feature_loader(
    mixture: Mixture,
    image: torch.Tensor,
    text: torch.Tensor,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    **sampling: Any,
) -> DataLoader:
    """Batches of cached features in exactly the order image batches of ``mixture`` would come in."""
    sampler = ResumableBatchSampler(mixture.layout(), batch_size, seed, start_step, num_steps, **sampling)
    return DataLoader(FeaturePairs(image, text), batch_sampler=sampler, collate_fn=lambda batch: batch)

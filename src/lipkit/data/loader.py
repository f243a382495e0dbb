"""A deterministic, resumable loader over map-style pair sources.

Batch ``s`` of a run is a pure function of ``(seed, s)``: epoch ``s // steps_per_epoch`` draws a
permutation from the seed, and each sample's random augmentation is seeded from ``(seed, s, slot)``.
A resumed run therefore sees exactly the batches an uninterrupted run would have seen, whatever the
number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from lipkit.data.sources import PairSource
from lipkit.errors import LipkitError

Transform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], torch.Tensor]


class PairDataset(Dataset):
    """Turns ``(index, seed)`` into ``(image_tensor, caption)``; the seed drives random augmentation."""

    def __init__(self, source: PairSource, transform: Transform) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, str]:
        index, seed = item
        torch.manual_seed(seed)
        return self.transform(self.source.image(index)), self.source.caption(index)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields batches of ``(index, seed)`` from step ``start_step`` on; drops the last partial batch.

    Args:
        n: Dataset size.
        batch_size: Samples per batch.
        seed: Base seed for the per-epoch permutation and the per-sample augmentation seeds.
        start_step: First step to yield (for resuming).
        num_steps: Number of batches to yield; ``None`` runs forever.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start_step: int = 0, num_steps: int | None = None):
        if n < batch_size:
            raise LipkitError(f"the dataset has {n} samples, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.start_step, self.num_steps = start_step, num_steps
        self.steps_per_epoch = n // batch_size

    def batch(self, step: int) -> list[tuple[int, int]]:
        """The ``(index, seed)`` pairs of batch ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        perm = torch.randperm(self.n, generator=g)[pos * self.batch_size : (pos + 1) * self.batch_size]
        base = (self.seed * 1_000_003 + step) * 4096
        return [(int(i), base + slot) for slot, i in enumerate(perm.tolist())]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        step = self.start_step
        while self.num_steps is None or step < self.start_step + self.num_steps:
            yield self.batch(step)
            step += 1

    def __len__(self) -> int:
        if self.num_steps is None:
            raise TypeError("an endless sampler has no length")
        return self.num_steps


class Collate:
    """Stacks images and tokenises captions in the worker (picklable, unlike a closure)."""

    def __init__(self, tokenize: Tokenize) -> None:
        self.tokenize = tokenize

    def __call__(self, batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions = zip(*batch)
        return torch.stack(images), self.tokenize(list(captions))


def make_train_loader(
    source: PairSource,
    transform: Transform,
    tokenize: Tokenize,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A loader whose ``k``-th batch is batch ``start_step + k`` of the deterministic sequence."""
    sampler = ResumableBatchSampler(len(source), batch_size, seed, start_step, num_steps)
    return DataLoader(
        PairDataset(source, transform),
        batch_sampler=sampler,
        collate_fn=Collate(tokenize),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )

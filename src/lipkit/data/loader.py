"""A deterministic, resumable loader over map-style pair sources and mixtures of them.

Batch ``s`` of a run is a pure function of ``(seed, s)`` (see :mod:`lipkit.data.order`): the sampler,
in the main process, computes which samples make up each global batch and the seed of each sample's
random augmentation; workers only decode and transform. A resumed run therefore sees exactly the
batches an uninterrupted run would have seen, whatever the number of workers, and each rank of a
distributed run takes its own slice of every global batch.

A sample whose image or caption cannot be read is replaced by a sample of the same source drawn from
its seed, so the replacement is as deterministic as the rest; replacements are counted by reason in
:attr:`TrainLoader.stats` and reported when the loader finishes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from lipkit.data.decode import CAPTION_FALLBACK, BadSample
from lipkit.data.order import BatchPlan, Layout
from lipkit.data.pairs import PairSource, prefetch
from lipkit.data.prototypes import FeaturePoint
from lipkit.data.spec import Mixture
from lipkit.errors import ConfigError, LipkitError

Transform = Callable[[Image.Image], torch.Tensor]
Tokenize = Callable[[list[str]], Any]  # captions -> what the text tower takes (ids, or ids with a mask)
MAX_REPLACEMENTS = 16
log = logging.getLogger("lipkit.data")


class TransformedPairs(Dataset):
    """``index`` -> ``(transformed image, caption)``, in source order (for embedding a whole source)."""

    def __init__(self, source: PairSource, transform: Transform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, str]:
        return self.transform(self.source.image(index)), self.source.caption(index)

    def __getitems__(self, indexes: list[int]) -> list[tuple[torch.Tensor, str]]:
        """A batch (the DataLoader's batched fetch): the source fetches its reads ahead together."""
        prefetch(self.source, indexes)
        return [self[index] for index in indexes]


class PairDataset(Dataset):
    """Turns ``(index, seed)`` into ``(image_tensor, caption, key, failures)``; the seed drives augmentation.

    Args:
        source: The pairs (for a mixture, its sources concatenated).
        transform: PIL image -> tensor.
        layout: The components of ``source``, for drawing replacements of bad samples.
        draft: Minimum (width, height) to decode JPEGs at (see :func:`lipkit.data.decode.open_image`).
    """

    def __init__(
        self,
        source: PairSource,
        transform: Transform,
        layout: Layout | None = None,
        draft: tuple[int, int] | None = None,
    ) -> None:
        self.source, self.transform, self.draft = source, transform, draft
        self.layout = layout or Layout.single(len(source))

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, items: list[tuple[int, int]]) -> list[tuple[torch.Tensor, str, str, tuple[str, ...]]]:
        """A batch (the DataLoader's batched fetch): the source fetches its reads ahead together."""
        prefetch(self.source, [index for index, _ in items])
        return [self[item] for item in items]

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, str, str, tuple[str, ...]]:
        index, seed = item
        failures: list[str] = []
        for attempt in range(MAX_REPLACEMENTS + 1):
            try:
                image, caption = self.source.image(index, self.draft), self.source.caption(index)
                break
            except BadSample as exc:
                failures.append(exc.reason)
                last, index = exc, self.layout.replacement(index, seed, attempt)
        else:
            raise LipkitError(f"{len(failures)} bad samples in a row (last: {last}); is the data readable?")
        if isinstance(image, FeaturePoint):  # a classifier prototype: already a trunk feature
            return image, caption, self.source.key(index), tuple(failures)
        torch.default_generator.manual_seed(seed)  # CPU only: torch.manual_seed also queues a lazy CUDA seeding
        return self.transform(image), caption, self.source.key(index), tuple(failures)


class ResumableBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's ``(index, seed)`` pairs of each batch from step ``start_step`` on.

    Args:
        n: Dataset size, or the :class:`Layout` of a mixture.
        batch_size: Global batch size (split evenly across ranks).
        seed: Base seed for the sample order and the per-sample augmentation seeds.
        start_step: First step to yield (for resuming).
        num_steps: Number of batches to yield; ``None`` runs forever.
        epoch_samples: Samples per epoch; default the whole data (see :class:`BatchPlan`).
        resampled: Draw samples with replacement.
        window: Shards per shuffle window.
        rank: This process's rank.
        world_size: Number of ranks.
    """

    def __init__(
        self,
        n: int | Layout,
        batch_size: int,
        seed: int,
        start_step: int = 0,
        num_steps: int | None = None,
        *,
        epoch_samples: int | None = None,
        resampled: bool = False,
        window: int = 4,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise ConfigError(f"the global batch {batch_size} does not split evenly across {world_size} ranks")
        layout = n if isinstance(n, Layout) else Layout.single(n)
        self.plan = BatchPlan(layout, batch_size, seed, epoch_samples, resampled, window)
        self.steps_per_epoch = self.plan.steps_per_epoch
        self.start_step, self.num_steps = start_step, num_steps
        per_rank = batch_size // world_size
        self.slice = slice(rank * per_rank, (rank + 1) * per_rank)

    def global_batch(self, step: int) -> list[tuple[int, int]]:
        """The ``(index, seed)`` pairs of global batch ``step`` (all ranks)."""
        return list(zip(self.plan.indices(step).tolist(), self.plan.seeds(step).tolist()))

    def batch(self, step: int) -> list[tuple[int, int]]:
        """This rank's ``(index, seed)`` pairs of batch ``step``."""
        return self.global_batch(step)[self.slice]

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

    def __call__(self, batch: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, Any]:
        images, captions = zip(*batch)
        return torch.stack(images), self.tokenize(list(captions))


class TrainCollate(Collate):
    """Like :class:`Collate`, keeping each sample's key and counting replaced samples by reason."""

    def __call__(self, batch: list[tuple[torch.Tensor, str, str, tuple[str, ...]]]) -> dict[str, Any]:
        images, captions, keys, failures = zip(*batch)
        skipped = Counter(reason for f in failures for reason in f)
        return {
            "images": stack_images(images),
            "tokens": self.tokenize(list(captions)),
            "keys": list(keys),
            "skipped": dict(skipped),
        }


def stack_images(images: tuple[torch.Tensor | FeaturePoint, ...]) -> torch.Tensor | dict[str, torch.Tensor]:
    """Stack a batch's images; a batch with prototypes (:class:`FeaturePoint`) becomes the fields of
    :class:`lipkit.models.image_inputs.MixedImages`: ``pixels`` (zeros at the prototype rows),
    ``features`` (zeros at the image rows) and ``from_features``."""
    points = [isinstance(image, FeaturePoint) for image in images]
    if not any(points):
        return torch.stack(images)
    width = next(image.features.shape[0] for image in images if isinstance(image, FeaturePoint))
    shape = next((image.shape for image in images if not isinstance(image, FeaturePoint)), (3, 1, 1))
    pixels = torch.stack([torch.zeros(shape) if p else image for p, image in zip(points, images)])
    features = torch.stack([image.features.float() if p else torch.zeros(width) for p, image in zip(points, images)])
    return {"pixels": pixels, "features": features, "from_features": torch.tensor(points)}


@dataclass
class LoaderStats:
    """What a loader had to leave out.

    Attributes:
        lost: Samples dropped when the sources were opened, by reason (e.g. ``corrupt_samples``,
            ``incomplete_samples``), and damaged shards (``truncated_shards``, ``corrupt_shards``).
        replaced: Samples replaced while loading, by reason (e.g. ``undecodable_image``).
        batches: Batches delivered.
        caption_fallbacks: Captions of the sources that are not UTF-8 and were read by the fallback
            encoding (see :func:`lipkit.data.decode.decode_text`).
    """

    lost: dict[str, int] = field(default_factory=dict)
    replaced: Counter = field(default_factory=Counter)
    batches: int = 0
    caption_fallbacks: int = 0

    def summary(self) -> str:
        """One line, e.g. ``replaced 3 samples (undecodable_image 3); lost when opening: truncated_shards 1``."""
        parts = []
        if self.replaced:
            detail = ", ".join(f"{k} {v}" for k, v in sorted(self.replaced.items()))
            parts.append(f"replaced {sum(self.replaced.values())} samples ({detail})")
        lost = {k: v for k, v in self.lost.items() if v}
        if lost:
            parts.append("lost when opening: " + ", ".join(f"{k} {v}" for k, v in sorted(lost.items())))
        if self.caption_fallbacks:
            parts.append(f"{self.caption_fallbacks} captions not UTF-8, read as {CAPTION_FALLBACK}")
        return "; ".join(parts)


class TrainLoader:
    """Iterates ``(images, tokens)`` batches; :meth:`batches` also gives keys and replacement counts.

    Attributes:
        loader: The underlying DataLoader (yielding dicts).
        sampler: Its batch sampler.
        stats: Running counts of dropped and replaced samples, for the trainer to log.
    """

    def __init__(self, loader: DataLoader, stats: LoaderStats) -> None:
        self.loader, self.sampler, self.stats = loader, loader.batch_sampler, stats

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self) -> Iterator[dict[str, Any]]:
        """Batches as dicts: ``images``, ``tokens``, ``keys`` and ``skipped`` (replacements by reason)."""
        try:
            for batch in self.loader:
                self.stats.replaced.update(batch["skipped"])
                self.stats.batches += 1
                yield batch
        finally:
            if self.stats.summary():
                log.warning("data: %s", self.stats.summary())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.batches():
            yield batch["images"], batch["tokens"]


def make_train_loader(
    source: PairSource | Mixture,
    transform: Transform,
    tokenize: Tokenize,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    **sampling: Any,
) -> TrainLoader:
    """A loader whose ``k``-th batch is (this rank's slice of) batch ``start_step + k`` of the sequence.

    Args:
        source: A source or a mixture of sources.
        transform: PIL image -> tensor (random augmentation is seeded per sample).
        tokenize: Captions -> token ids.
        batch_size: Global batch size.
        seed: The run's seed.
        start_step: First step (for resuming).
        num_steps: Number of batches; ``None`` runs forever.
        workers: Loader processes (0 loads in this process).
        pin_memory: Pin batches for faster copies to the GPU.
        **sampling: ``epoch_samples``, ``resampled``, ``window``, ``rank``, ``world_size`` for
            :class:`ResumableBatchSampler`, and ``draft`` for :class:`PairDataset`.
    """
    mixture = source if isinstance(source, Mixture) else Mixture.of(source)
    draft = sampling.pop("draft", None)
    layout = mixture.layout()
    sampler = ResumableBatchSampler(layout, batch_size, seed, start_step, num_steps, **sampling)
    loader = DataLoader(
        PairDataset(mixture.concatenated(), transform, layout, draft),
        batch_sampler=sampler,
        collate_fn=TrainCollate(tokenize),
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    fallbacks = sum(getattr(s, "caption_fallbacks", 0) for s in mixture.sources)
    return TrainLoader(loader, LoaderStats(lost=mixture.skipped, caption_fallbacks=fallbacks))

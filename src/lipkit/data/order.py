"""The deterministic sample order: global batch ``s`` is a pure function of ``(seed, s)``.

The data is one or more *components* (sources) laid end to end in one index space, each with a mixing
weight and, for sharded sources, its shard boundaries. The stream of samples is cut into epochs of ``E``
samples (a whole number of batches). Within epoch ``e``:

* each component ``c`` contributes ``k_c``, its weight's share of ``E`` (exact counts, largest remainder),
  interleaved by a pattern shuffled from ``(seed, e)``; a pattern longer than 2**20 repeats;
* component ``c`` serves its ``k_c`` samples from fresh permutations drawn from ``(seed, c, e, cycle)``,
  one after another (``cycle`` > 0 only when ``k_c`` exceeds the component's size);
* a sharded component's permutation shuffles the shard order, then the samples within windows of
  ``window`` consecutive shards (a shuffle buffer that stays local on disk).

With the defaults (``E`` = all samples, weights proportional to sizes) every sample is seen exactly once
per epoch, less the remainder of a partial last batch. In ``resampled`` mode every slot instead draws a
component by weight and a sample uniformly, with replacement, from ``(seed, step)``.

Because nothing depends on what came before, a resumed run, a run with another number of loader
workers and every rank of a distributed run compute the same batches.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lipkit.errors import LipkitError

PATTERN_MAX = 1 << 20
SLOTS = 1 << 24  # augmentation seeds stay distinct for global batches up to 16M
_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Layout:
    """Components laid end to end: sizes, mixing weights (summing to 1) and optional group boundaries."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    groups: tuple[np.ndarray | None, ...]

    @classmethod
    def single(cls, n: int, groups: np.ndarray | None = None) -> Layout:
        """One component of ``n`` samples."""
        return cls((n,), (1.0,), (groups,))

    @property
    def offsets(self) -> np.ndarray:
        """First global index of each component, then the total."""
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    def replacement(self, index: int, seed: int, attempt: int) -> int:
        """A stand-in for a bad sample: a sample of the same component drawn from ``(seed, attempt)``."""
        offsets = self.offsets
        c = int(np.searchsorted(offsets, index, side="right")) - 1
        rng = np.random.default_rng([seed & _U64, 3, attempt])
        return int(offsets[c] + rng.integers(self.sizes[c]))


def allocate(total: int, weights: tuple[float, ...]) -> np.ndarray:
    """Split ``total`` into integer counts proportional to ``weights`` (largest remainder, ties to the first)."""
    raw = np.asarray(weights, np.float64) * total
    counts = np.floor(raw).astype(np.int64)
    rest = int(total - counts.sum())
    counts[np.argsort(-(raw - counts), kind="stable")[:rest]] += 1
    return counts


def window_shuffle(n: int, bounds: np.ndarray | None, window: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of ``range(n)``: groups in random order, samples shuffled within windows of groups."""
    if bounds is None or len(bounds) - 1 <= window:
        return rng.permutation(n)
    groups = len(bounds) - 1
    perm = rng.permutation(groups)
    sizes = np.diff(bounds)[perm]
    within = np.arange(n) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    index = np.repeat(bounds[:-1][perm], sizes) + within
    windows = np.repeat(np.arange(groups) // window, sizes)
    return index[np.lexsort((rng.random(n), windows))]


class BatchPlan:
    """Global batch ``step`` -> sample indices and augmentation seeds.

    Args:
        layout: The components.
        batch_size: Global batch size.
        seed: The run's seed.
        epoch_samples: Samples per epoch (rounded down to whole batches); default all samples.
        resampled: Draw with replacement instead of walking permutations.
        window: Shards per shuffle window.

    Raises:
        LipkitError: The data holds fewer samples than one batch.
    """

    def __init__(
        self,
        layout: Layout,
        batch_size: int,
        seed: int,
        epoch_samples: int | None = None,
        resampled: bool = False,
        window: int = 4,
    ) -> None:
        total = sum(layout.sizes)
        if total < batch_size:
            raise LipkitError(f"the dataset has {total} samples, fewer than one batch of {batch_size}")
        epoch = (epoch_samples or total) // batch_size * batch_size
        if epoch < batch_size:
            raise LipkitError(f"epoch_samples={epoch_samples} is less than one batch of {batch_size}")
        self.layout, self.batch_size, self.seed = layout, batch_size, seed & _U64
        self.resampled, self.window, self.epoch_samples = resampled, window, epoch
        self.steps_per_epoch = epoch // batch_size
        self.sizes, self.offsets = np.asarray(layout.sizes, np.int64), layout.offsets
        self.period = min(epoch, PATTERN_MAX)
        self.period_counts = allocate(self.period, layout.weights)
        self._cache: dict[tuple, np.ndarray | tuple] = {}

    def seeds(self, step: int) -> np.ndarray:
        """Augmentation seeds of the slots of global batch ``step``."""
        base = ((self.seed * 1_000_003 + step) % (1 << 39)) * SLOTS  # + slot stays below 2**63
        return base + np.arange(self.batch_size, dtype=np.int64)

    def indices(self, step: int) -> np.ndarray:
        """Global sample indices of global batch ``step``."""
        if self.resampled:
            return self._resampled(step)
        epoch, pos = divmod(step, self.steps_per_epoch)
        u = pos * self.batch_size + np.arange(self.batch_size, dtype=np.int64)  # positions within the epoch
        if len(self.sizes) == 1:
            comp, local = np.zeros_like(u), u
        else:
            pattern, rank = self._pattern(epoch)
            j = u % self.period
            comp = pattern[j]
            local = (u // self.period) * self.period_counts[comp] + rank[j]
        out = np.empty_like(u)
        for c in np.unique(comp):
            mask = comp == c
            out[mask] = self._serve(int(c), epoch, local[mask]) + self.offsets[c]
        return out

    def _serve(self, c: int, epoch: int, local: np.ndarray) -> np.ndarray:
        """Samples at positions ``local`` of component ``c``'s sequence in ``epoch``."""
        n = int(self.sizes[c])
        cycles, out = local // n, np.empty_like(local)
        for cycle in np.unique(cycles):
            mask = cycles == cycle
            out[mask] = self._order(c, epoch, int(cycle))[local[mask] % n]
        return out

    def _order(self, c: int, epoch: int, cycle: int) -> np.ndarray:
        key = ("order", c, epoch, cycle)
        if key not in self._cache:
            rng = np.random.default_rng([self.seed, 1, c, epoch, cycle])
            self._remember(key, window_shuffle(int(self.sizes[c]), self.layout.groups[c], self.window, rng))
        return self._cache[key]

    def _pattern(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Which component each position of a period serves, and how many of its own came before."""
        key = ("pattern", epoch)
        if key not in self._cache:
            counts = self.period_counts
            pattern = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
            np.random.default_rng([self.seed, 0, epoch]).shuffle(pattern)
            order = np.argsort(pattern, kind="stable")
            rank = np.empty(self.period, np.int64)
            rank[order] = np.arange(self.period) - (np.cumsum(counts) - counts)[pattern[order]]
            self._remember(key, (pattern, rank))
        return self._cache[key]

    def _remember(self, key: tuple, value: np.ndarray | tuple) -> None:
        if len(self._cache) >= 2 * len(self.sizes) + 4:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = value

    def _resampled(self, step: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 2, step])
        k = len(self.sizes)
        comp = rng.choice(k, size=self.batch_size, p=self.layout.weights) if k > 1 else np.zeros(self.batch_size, int)
        return (rng.random(self.batch_size) * self.sizes[comp]).astype(np.int64) + self.offsets[comp]

"""Where curation stages run: this process, a local process pool, or a Ray cluster (Ray Data ``map_batches``).

A stage is a pure function ``stage(batch, **context) -> batch`` over a batch of rows (a dict of equally
long numpy arrays, the batch format of Ray Data's ``map_batches``). :meth:`Runner.map` applies a stage
to every batch and returns the outputs in input order; nothing else about where it ran can reach the
result. The runner is chosen once, by :func:`choose_runner`.

* :class:`LocalRunner`: ``workers`` processes (``multiprocessing``); the context (the data source, the
  matcher) is sent to each process once, when the pool starts. One worker runs in this process.
* :class:`RayRunner`: a Ray Data dataset of the batches, one block each, mapped by ``map_batches``
  tasks (the stages are pure functions: no actors are needed); the outputs come back to this process.
"""

from __future__ import annotations

import functools
import multiprocessing
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lipkit import ray_cluster
from lipkit.errors import LipkitError

Batch = dict[str, np.ndarray]
Stage = Callable[..., Batch]


class Runner:
    """Runs stages over batches; subclasses choose where (see the module docstring)."""

    description = "this process"

    def map(self, stage: Stage, batches: Sequence[Batch], context: dict[str, Any] | None = None) -> list[Batch]:
        """``stage(batch, **context)`` for every batch, in input order."""
        return [stage(b, **(context or {})) for b in batches]

    def close(self) -> None:
        """Release the runner's processes or cluster connection."""

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_STAGE: Callable[[Batch], Batch] | None = None  # the stage bound to its context, in a pool process


def _bind(stage: Stage, context: dict[str, Any]) -> None:
    global _STAGE
    _STAGE = functools.partial(stage, **context)


def _apply(batch: Batch) -> Batch:
    assert _STAGE is not None, "the pool was started without a stage"
    return _STAGE(batch)


class LocalRunner(Runner):
    """A pool of ``workers`` processes (one: this process).

    Args:
        workers: Processes; at least 1.
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise LipkitError(f"--workers must be at least 1, got {workers}")
        self.workers = workers
        self.description = "this process" if workers == 1 else f"{workers} processes"

    def map(self, stage: Stage, batches: Sequence[Batch], context: dict[str, Any] | None = None) -> list[Batch]:
        if self.workers == 1 or len(batches) <= 1:
            return super().map(stage, batches, context)
        ctx = multiprocessing.get_context()
        with ctx.Pool(min(self.workers, len(batches)), initializer=_bind, initargs=(stage, context or {})) as pool:
            return pool.map(_apply, batches, chunksize=1)


class RayRunner(Runner):
    """Ray Data on a cluster, or on a Ray instance this process starts.

    Args:
        address: ``local`` (start Ray on this machine), or a cluster address (``HOST:PORT``,
            ``ray://HOST:PORT``, ``auto``). A Ray instance this process already joined is used as it is.
        num_cpus: CPUs of a local instance (``None``: all).
    """

    def __init__(self, address: str, num_cpus: int | None = None) -> None:
        self.address = address
        self.description = f"Ray ({address})"
        self._started = ray_cluster.connect(address, num_cpus)

    def map(self, stage: Stage, batches: Sequence[Batch], context: dict[str, Any] | None = None) -> list[Batch]:
        import pyarrow as pa
        import ray

        if not batches:
            return []
        ray.data.DataContext.get_current().enable_progress_bars = False
        numbered = [{**b, "_batch": np.full(len(next(iter(b.values()))), n, np.int64)} for n, b in enumerate(batches)]
        dataset = ray.data.from_arrow([pa.table(_arrow_columns(b)) for b in numbered])
        mapped = dataset.map_batches(
            _ray_stage, fn_kwargs={"stage": stage, "context": context or {}}, batch_size=None, batch_format="numpy"
        )
        return _reassemble(list(mapped.iter_batches(batch_size=None, batch_format="numpy")), len(batches))

    def close(self) -> None:
        import ray

        if self._started:
            ray.shutdown()
            self._started = False


def _arrow_columns(batch: Batch) -> dict[str, Any]:
    """Numpy columns as Arrow can take them (object arrays of text as lists)."""
    return {name: (values.tolist() if values.dtype == object else values) for name, values in batch.items()}


def _ray_stage(batch: Batch, stage: Stage, context: dict[str, Any]) -> Batch:
    """Run a stage on one block, carrying the block's number through."""
    number = batch.pop("_batch")
    return {**stage(batch, **context), "_batch": number}  # a stage keeps its rows: one output row per input row


def _reassemble(blocks: list[Batch], n: int) -> list[Batch]:
    """The output blocks in the order of the input batches (Ray may return them in any order)."""
    found: dict[int, Batch] = {}
    for block in blocks:
        numbers = block.pop("_batch")
        for number in np.unique(numbers):
            rows = numbers == number
            part = {name: values[rows] for name, values in block.items()}
            found[int(number)] = _concat([found[int(number)], part]) if int(number) in found else part
    if sorted(found) != list(range(n)):
        raise LipkitError(f"Ray returned {len(found)} of {n} batches")
    return [found[i] for i in range(n)]


def _concat(batches: list[Batch]) -> Batch:
    return {name: np.concatenate([b[name] for b in batches]) for name in batches[0]}


def choose_runner(workers: int = 1, ray: str | None = None) -> Runner:
    """Ray when ``ray`` names a cluster (or ``local``), else a local pool of ``workers`` processes.

    Raises:
        LipkitError: ``workers`` below 1, or the Ray cluster cannot be reached.
    """
    return RayRunner(ray) if ray else LocalRunner(workers)

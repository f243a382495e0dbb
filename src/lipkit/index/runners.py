"""Where an embedding job runs: one process, torchrun ranks, or a Ray cluster. Chosen in :func:`choose_runner`.

Every runner takes the planned batches (a part name and the item indexes of one batch) and yields
embedded batches, the output of :class:`~lipkit.index.stages.Embedder` with ``part`` and ``index``
columns, in any order; the job puts each part together and writes it.

* :class:`LocalRunner`: decoding in DataLoader worker processes, the model in this process.
* :class:`TorchrunRunner` (``WORLD_SIZE`` > 1): the local runner on each rank's share of the parts;
  rank 0 plans and broadcasts the plan, each rank writes its own parts, and rank 0 writes the
  manifest after a barrier.
* :class:`RayRunner` (``--ray ADDRESS`` or ``--ray local``): a Ray Data dataset of the rows, one block
  per planned batch, decoded by one ``map_batches`` stage and embedded by another on an actor pool that
  holds the model (Ray may fuse the two onto the pool); the driver writes the parts.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lipkit import ray_cluster

if TYPE_CHECKING:
    import torch

    from lipkit.index.stages import Decoder
    from lipkit.models import DualEncoder

# One planned batch: the part it belongs to and the item indexes it holds
Planned = tuple[str, np.ndarray]
# The large numeric columns of a decoded batch
TENSOR_COLUMNS = {"pixels", "ids", "mask"}


def plan_batches(parts: Sequence[tuple[str, Sequence[int]]], batch_size: int) -> list[Planned]:
    """Cut each part into batches of ``batch_size`` items (a batch never spans two parts)."""
    batches = []
    for name, indexes in parts:
        array = np.asarray(indexes, np.int64)
        batches += [(name, array[i : i + batch_size]) for i in range(0, len(array), batch_size)]
    return batches


class _PlannedRows:
    """Planned batch ``b`` -> its decoded rows (a dataset of whole batches, for the DataLoader)."""

    def __init__(self, decoder: Decoder, batches: list[Planned]) -> None:
        self.decoder, self.batches = decoder, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict[str, Any]:
        import torch

        name, indexes = self.batches[b]
        rows = self.decoder({"part": np.full(len(indexes), name, object), "index": indexes})
        for column in TENSOR_COLUMNS & rows.keys():  # tensors leave a worker through shared memory, not a pipe
            rows[column] = torch.from_numpy(rows[column])
        return rows


def _as_is(batch: Any) -> Any:
    return batch


class LocalRunner:
    """One process: decoding in ``workers`` DataLoader processes, the model here.

    Attributes:
        rank: This process's rank (0).
        world: Processes in the job (1).
        device: Where the model runs.
    """

    rank, world = 0, 1

    def __init__(self, device: torch.device, workers: int = 0) -> None:
        self.device, self.workers = device, workers

    @property
    def writes_manifest_per_part(self) -> bool:
        """Whether the manifest is rewritten after every part (only one process writes parts)."""
        return self.world == 1

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        return value

    def barrier(self) -> None:
        """Wait for every rank."""

    def share(self, parts: list[Any]) -> list[Any]:
        """The parts this process embeds."""
        return parts[self.rank :: self.world]

    def run(self, decoder: Decoder, model: DualEncoder, batches: list[Planned]) -> Iterator[dict[str, np.ndarray]]:
        """Decode and embed the batches, yielding them in order."""
        from torch.utils.data import DataLoader

        from lipkit.index.stages import Embedder

        if not batches:
            return
        embedder = Embedder(model, self.device, decoder.modalities)
        rows = _PlannedRows(decoder, batches)
        pin = self.device.type == "cuda"
        loader = DataLoader(rows, batch_size=None, num_workers=self.workers, collate_fn=_as_is, pin_memory=pin)
        for decoded in loader:
            yield embedder(decoded)

    def close(self) -> None:
        """Leave the job's process group or cluster."""


class TorchrunRunner(LocalRunner):
    """A rank of a torchrun job (see the module docstring)."""

    def __init__(self, device_name: str, workers: int = 0) -> None:
        from lipkit.train.distributed import setup

        self.env, device = setup(device_name)
        super().__init__(device, workers)
        self.rank, self.world = self.env.rank, self.env.world_size

    def broadcast(self, value: Any) -> Any:
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        from lipkit.train.distributed import teardown

        teardown(self.env)


class RayRunner(LocalRunner):
    """The job on a Ray cluster through Ray Data (see the module docstring).

    Args:
        address: A cluster address (``ray://HOST:PORT``, ``HOST:PORT``, ``auto``), or ``local`` to start a
            Ray instance in this machine. An instance this process already started is used as it is.
        device: Where the model actors run (``cuda`` gives each actor a GPU).
        actors: Model actors in the pool.
    """

    def __init__(self, address: str, device: torch.device, actors: int = 1) -> None:
        super().__init__(device, 0)
        self.actors = actors
        self._started = ray_cluster.connect(address)

    def run(self, decoder: Decoder, model: DualEncoder, batches: list[Planned]) -> Iterator[dict[str, np.ndarray]]:
        """Decode and embed the batches on the cluster, yielding them as they come (the model is moved to the CPU
        here, to be shipped to the actors)."""
        import ray

        from lipkit.index.stages import Embedder

        if not batches:
            return
        gpus = 1 if self.device.type == "cuda" else 0
        rows = _dataset(batches)
        decoded = rows.map_batches(_decode, fn_kwargs={"decoder": decoder}, batch_size=None)
        embedded = decoded.map_batches(
            Embedder,
            fn_constructor_kwargs={"model": model.cpu(), "device": self.device.type, "modalities": decoder.modalities},
            compute=ray.data.ActorPoolStrategy(size=self.actors),
            batch_size=None,
            num_gpus=gpus,
        )
        yield from embedded.iter_batches(batch_size=None, batch_format="numpy")

    def close(self) -> None:
        import ray

        if self._started:
            ray.shutdown()


def _dataset(batches: list[Planned]) -> Any:
    """A Ray dataset of ``part``/``index`` rows, one block per planned batch."""
    import pyarrow as pa
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    tables = [pa.table({"part": [name] * len(indexes), "index": indexes}) for name, indexes in batches]
    return ray.data.from_arrow(tables)


def _decode(batch: dict[str, np.ndarray], decoder: Decoder) -> dict[str, np.ndarray]:
    return decoder(batch)


def choose_runner(device_name: str = "auto", workers: int = 0, ray: str | None = None, actors: int = 1) -> LocalRunner:
    """The runner for this process: Ray when ``ray`` names a cluster, torchrun's ranks when
    ``WORLD_SIZE`` > 1, else one local process. The one place the choice is made.

    Raises:
        ConfigError: A bad device name, or Ray together with torchrun.
        LipkitError: The Ray cluster cannot be reached.
    """
    from lipkit.errors import ConfigError
    from lipkit.utils import rank_and_world, resolve_device

    _, world = rank_and_world()
    if ray is not None:
        if world > 1:
            raise ConfigError("--ray runs the job on a Ray cluster: start it as one process, not under torchrun")
        return RayRunner(ray, resolve_device(device_name), actors)
    if world > 1:
        return TorchrunRunner(device_name, workers)
    return LocalRunner(resolve_device(device_name), workers)

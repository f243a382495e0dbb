"""One code path for one process and for torchrun: the process group is chosen from the environment.

Under ``torchrun`` (``WORLD_SIZE`` > 1) every process joins a process group (NCCL on GPUs, gloo on
CPUs), the model is wrapped in DDP, each rank loads its slice of every global batch, and the loss is
computed over the global batch (:mod:`lipkit.losses.distributed`). Run as a plain process, none of
this happens.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from lipkit.errors import ConfigError
from lipkit.utils import check_device, rank_and_world, resolve_device


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job.

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Whether this process writes logs, checkpoints and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """Whether more than one process takes part."""
        return self.world_size > 1


def env_from_environ() -> DistEnv:
    """Read torchrun's ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` (a single process without them)."""
    rank, world_size = rank_and_world()
    return DistEnv(rank=rank, world_size=world_size, local_rank=int(os.environ.get("LOCAL_RANK", 0)))


def setup(device_name: str, timeout_s: float = 600.0) -> tuple[DistEnv, torch.device]:
    """Join the process group if launched by torchrun, and pick this process's device.

    Args:
        device_name: ``auto``, ``cpu``, ``cuda``...; under torchrun, CUDA devices are taken by local rank.
        timeout_s: Collective timeout: a rank that stops answering ends the others' wait with an error.

    Raises:
        ConfigError: The device is not a device name, or one this machine lacks (checked before anything
            is created).
    """
    env = env_from_environ()
    device = resolve_device(device_name)
    if device.type == "cuda" and env.distributed:
        device = torch.device("cuda", env.local_rank)
        check_device(device)
        torch.cuda.set_device(device)
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return env, device


def check_batch(batch_size: int, env: DistEnv) -> int:
    """The per-rank batch: the global batch divided by the world size (which must divide it)."""
    if batch_size % env.world_size:
        raise ConfigError(f"data.batch_size {batch_size} is not divisible by the {env.world_size} processes")
    return batch_size // env.world_size


def wrap(model: nn.Module, env: DistEnv, device: torch.device) -> nn.Module:
    """DDP-wrap ``model`` when distributed; return it unchanged otherwise."""
    if not env.distributed:
        return model
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def deferred_sync(net: nn.Module) -> Callable[[], AbstractContextManager]:
    """A context factory for backward passes whose gradients ``net`` should keep local for now.

    DDP's ``no_sync`` (gradients accumulate locally and are all-reduced by the first backward pass
    outside it); a null context otherwise. FSDP2 needs none: it reduce-scatters each backward pass's
    gradients into the sharded gradients, whose sum is the same, and keeping them local instead would
    hold unsharded gradients of the whole model.
    """
    ddp = getattr(net, "_orig_mod", net)  # the module under torch.compile
    return ddp.no_sync if isinstance(ddp, nn.parallel.DistributedDataParallel) else nullcontext


def mean_across_ranks(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The mean of ``x`` over all ranks (``x`` itself in one process)."""
    if not env.distributed:
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x / env.world_size


def barrier(env: DistEnv) -> None:
    """Wait for every rank (no-op in one process)."""
    if env.distributed:
        dist.barrier()


def teardown(env: DistEnv) -> None:
    """Leave the process group."""
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(model: nn.Module) -> list[nn.Parameter]:
    """FSDP2: shard each transformer block, then the rest of each tower, over the process group.

    Each tower is a unit of its own, so calling one tower alone (``encode_image`` and ``encode_text``,
    as evaluation does) gathers its parameters too; like a root unit, it keeps them gathered from the
    forward to the backward pass. A block's ``forward_at`` (a tower's last block, when it pools one
    token) gathers the block's parameters as its ``forward`` does. Scalar parameters (the temperature
    and bias) cannot be sharded; they stay replicated and their gradients are averaged by
    :func:`average_replicated_grads`. Returns those parameters.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for tower in (model.visual, model.text):
        transformer = getattr(tower, "transformer", None)
        for block in getattr(transformer, "blocks", []):
            fully_shard(block)
            register_fsdp_forward_method(block, "forward_at")
        fully_shard(tower, reshard_after_forward=False)
    scalars = [p for p in (model.logit_scale, model.logit_bias) if p is not None]
    fully_shard(model, ignored_params=set(scalars))
    return scalars


def average_grads(params: list[nn.Parameter], env: DistEnv) -> None:
    """Average ``params``' gradients over the ranks, what DDP does for the parameters it wraps.

    For parameters outside DDP and FSDP: those FSDP leaves replicated, and the heads trained on cached
    features. A no-op in one process.
    """
    if not env.distributed:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= env.world_size


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> tuple[dict, dict]:
    """Model and optimizer state as full tensors on CPU, optimizer state keyed by parameter name.

    One format whether or not the model is sharded, so a checkpoint moves between one process, DDP
    and FSDP. A collective call when sharded.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options) if sharded else model.state_dict()
    return model_state, get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict, optim: dict, sharded: bool):
    """Load what :func:`full_state` saved into a model (sharded or not) and its optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    if sharded:
        set_model_state_dict(model, state, options=options)
    else:
        model.load_state_dict(state)
    set_optimizer_state_dict(model, optimizer, optim, options=options)

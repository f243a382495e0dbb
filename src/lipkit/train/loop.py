"""The training loop: one code path from a single CPU process upwards."""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lipkit.config import save_yaml, to_dict
from lipkit.data.loader import make_train_loader
from lipkit.data.spec import open_mixture
from lipkit.errors import ConfigError, FolderInUseError, TrainingDivergedError
from lipkit.losses import LOSSES, create_loss
from lipkit.models import DualEncoder, create_model, image_transform
from lipkit.models.factory import batch_tokenizer, preprocess_config
from lipkit.models.text_inputs import TensorRecord
from lipkit.train import checkpoint as ckpt
from lipkit.train import distributed
from lipkit.train.accumulate import cached_accumulation_backward
from lipkit.train.config import TrainConfig
from lipkit.train.distributed import DistEnv
from lipkit.train.evaluate import evaluate_now
from lipkit.train.feature_cache import cached_features, check_lockable, make_feature_loader
from lipkit.train.metrics import MetricLogger
from lipkit.train.optim import build_optimizer, lr_at
from lipkit.utils import FolderLock, atomic_write_text, seed_everything

Callback = Callable[[int, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run_dir: The run directory (config, metrics, checkpoints).
        step: Optimizer steps completed.
        loss: Mean loss over the last logging window.
        checkpoint: The final checkpoint.
        data_summary: Samples the loader dropped or replaced (unreadable images, truncated shards), or "".
    """

    run_dir: Path
    step: int
    loss: float
    checkpoint: Path
    data_summary: str = ""


@dataclass
class TrainState:
    """Everything the loop mutates, kept together so steps stay short."""

    model: DualEncoder
    loss_fn: nn.Module
    optimizer: torch.optim.Optimizer
    env: DistEnv = field(default_factory=DistEnv)
    net: nn.Module | None = None  # what the forward pass runs: the model, or its DDP wrapper
    cached: bool = False  # batches hold cached frozen-trunk features instead of images and tokens
    replicated: list[nn.Parameter] = field(default_factory=list)  # FSDP: parameters left unsharded
    step: int = 0
    window: list[torch.Tensor] | None = None
    window_start: float = 0.0
    last_loss: float = float("nan")

    @property
    def device(self) -> torch.device:
        """Where the model (this rank's shard of it) lives."""
        return next(self.model.parameters()).device


def prepare_run_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    """Create the run directory and save the resolved config; refuse to overwrite a run by accident.

    Every rank checks (so all raise together); only the main rank writes.
    """
    run_dir = Path(cfg.out_dir) / cfg.name
    if cfg.resume is None and not cfg.overwrite and ckpt.list_checkpoints(run_dir):
        raise ConfigError(
            f"run directory {run_dir} already holds checkpoints: pass resume=latest to continue it, "
            "name=NEW_NAME for a new run, or overwrite=true to start it again"
        )
    distributed.barrier(env)
    if env.is_main:
        if cfg.overwrite and cfg.resume is None:
            for old in ckpt.list_checkpoints(run_dir):
                old.unlink()
            (run_dir / "metrics.jsonl").unlink(missing_ok=True)
            shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        save_yaml(cfg, run_dir / "config.yaml")
    distributed.barrier(env)
    return run_dir


def loss_for(cfg: TrainConfig, env: DistEnv) -> nn.Module:
    """The configured loss; across processes, its form that computes the loss over the global batch."""
    name = cfg.loss
    if env.distributed:
        form = LOSSES.get(name).distributed_form
        if form is None:
            forms = ", ".join(n for n in LOSSES.names() if LOSSES.get(n).distributed_form is not None)
            raise ConfigError(f"loss {name!r} does not run across processes; these do: {forms}")
        name = form
    return create_loss(name, **cfg.loss_options)


def build_state(cfg: TrainConfig, env: DistEnv, device: torch.device) -> TrainState:
    """Model, loss and optimizer, on ``device``, seeded by ``cfg.seed``."""
    seed_everything(cfg.seed)
    model = create_model(cfg.model, pretrained=cfg.pretrained, **cfg.model_overrides).to(device).train()
    if cfg.precision == "bf16-pure":
        model.to(torch.bfloat16)
    model.set_grad_checkpointing(cfg.grad_checkpointing)
    if LOSSES.get(cfg.loss).needs_bias and model.logit_bias is None:
        raise ConfigError(f"loss {cfg.loss!r} needs a model with a logit bias (init_logit_bias); {cfg.model} has none")
    if cfg.cache_features and cfg.fsdp:
        raise ConfigError("cache_features trains only the small heads: use DDP (fsdp=false) across processes")
    if cfg.cache_features and cfg.accum_micro_batch is not None:
        raise ConfigError("accum_micro_batch does not apply to cache_features: the heads need no micro-batches")
    if cfg.fsdp and not env.distributed:
        raise ConfigError("fsdp=true shards the model over processes: launch with torchrun")
    if cfg.cache_features:
        check_lockable(model)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    replicated = distributed.shard(model) if cfg.fsdp else []
    optimizer = build_optimizer(model, cfg.optim, device)
    # On cached features the heads run outside the model's forward, where DDP cannot see them: their
    # gradients are averaged by hand after the backward pass (train_step) instead.
    net = model if cfg.fsdp or cfg.cache_features else distributed.wrap(model, env, device)
    backend = compile_backend(cfg.compile, device)
    if backend is not None:
        if cfg.compile == "auto":  # the default must never stop a run: fall back to eager per frame
            import torch._dynamo as dynamo

            dynamo.config.suppress_errors = True
        net = torch.compile(net, backend=backend)
    return TrainState(model, loss_for(cfg, env), optimizer, env, net, cfg.cache_features, replicated)


def compile_backend(setting: str | None, device: torch.device) -> str | None:
    """The ``torch.compile`` backend for the ``compile`` setting on ``device``, or ``None`` for eager.

    ``auto`` compiles with inductor on CUDA only: there it fuses the elementwise work between the
    matrix products, while on CPUs compiling takes long and the step gets slower (docs/benchmarks.md,
    "Training step on CPU").
    """
    if setting == "auto":
        return "inductor" if device.type == "cuda" else None
    return setting or None


def restore(state: TrainState, path: Path) -> None:
    """Load model, optimizer, step and random generators from a checkpoint."""
    saved = ckpt.load_checkpoint(path)
    sharded = bool(state.replicated)
    distributed.load_full_state(state.model, state.optimizer, saved["model"], saved["optimizer"], sharded)
    state.step = int(saved["step"])
    ckpt.set_rng_state(saved["rng"])


def save(state: TrainState, cfg: TrainConfig, run_dir: Path) -> Path:
    """Write a checkpoint for the current step (main rank) and prune old ones; every rank calls it."""
    path = ckpt.checkpoint_path(run_dir, state.step)
    model_state, optim_state = distributed.full_state(state.model, state.optimizer, bool(state.replicated))
    if not state.env.is_main:
        return path
    payload = {
        "model": model_state,
        "optimizer": optim_state,
        "step": state.step,
        "rng": ckpt.rng_state(),
        "config": to_dict(cfg),
        "model_config": to_dict(state.model.cfg),
    }
    ckpt.save_checkpoint(path, payload)
    ckpt.prune_checkpoints(run_dir, cfg.keep_checkpoints)
    return path


def compute_loss(state: TrainState, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Forward both towers (or, with cached features, both heads) and the loss."""
    if state.cached:
        return state.loss_fn(state.model.forward_from_features(images, tokens))
    return state.loss_fn((state.model if state.net is None else state.net)(images, tokens))


def precision(cfg: TrainConfig, device: torch.device) -> AbstractContextManager:
    """The autocast context for ``cfg.precision`` on ``device``."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if cfg.precision == "bf16" else nullcontext()


def backward(state: TrainState, cfg: TrainConfig, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Forward and backward one batch (through the feature cache when micro-batching); returns the loss.

    The batch may be in host memory: this is where it moves to the device, whole, or, when
    micro-batching, one micro-batch at a time (so the device never holds the whole batch of images).

    Micro-batches run through the DDP or FSDP form of the model; under DDP gradients are all-reduced
    once, in the last micro-batch's backward pass.
    """
    micro, device = cfg.accum_micro_batch, state.device
    if micro is not None and micro < images.shape[0]:
        context = partial(precision, cfg, device)
        net = state.model if state.net is None else state.net
        no_sync = distributed.deferred_sync(net)
        place = partial(place_batch, device=device, cfg=cfg)
        return cached_accumulation_backward(net, state.loss_fn, images, tokens, micro, context, no_sync, place)
    images, tokens = place_batch(images, tokens, device, cfg)
    with precision(cfg, device):
        loss = compute_loss(state, images, tokens)
    loss.backward()
    return loss.detach()


def train_step(state: TrainState, cfg: TrainConfig, images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """One optimizer step; returns (loss, grad_norm) as a 2-vector on the device, without syncing."""
    lr = lr_at(state.step, cfg.steps, cfg.optim)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    loss = backward(state, cfg, images, tokens)
    by_hand = [p for p in state.model.parameters() if p.requires_grad] if state.cached else state.replicated
    distributed.average_grads(by_hand, state.env)
    params = [p for p in state.model.parameters() if p.grad is not None]
    if cfg.optim.grad_clip is not None:  # rescales on the device by min(1, clip / norm): no sync
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
    else:  # only the norm, for the record: no pass over every gradient multiplying it by 1
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    state.optimizer.step()
    state.step += 1
    return torch.stack([loss.float(), grad_norm.detach().float()])


def check_window(state: TrainState) -> torch.Tensor:
    """Stack the unchecked step records and stop the run if any loss or gradient is not finite."""
    stats = distributed.mean_across_ranks(torch.stack(state.window), state.env).cpu()  # (steps, 2): loss, grad norm
    if not torch.isfinite(stats).all():
        bad = state.step - len(state.window) + int((~torch.isfinite(stats)).any(dim=1).nonzero()[0]) + 1
        raise TrainingDivergedError(
            f"the loss or gradient became {stats[bad - state.step - 1].tolist()} (loss, grad norm) at step {bad}; "
            "the last good checkpoint is kept. Lower optim.lr, set optim.grad_clip, or use precision=fp32."
        )
    return stats


def log_window(state: TrainState, cfg: TrainConfig, logger: MetricLogger, bar: tqdm) -> dict[str, Any]:
    """Check, summarise and record the steps since the last record."""
    stats = check_window(state)
    elapsed = max(time.perf_counter() - state.window_start, 1e-9)
    metrics = {
        "loss": float(stats[:, 0].mean()),
        "grad_norm": float(stats[:, 1].mean()),
        "lr": lr_at(state.step - 1, cfg.steps, cfg.optim),
        "logit_scale": float(state.model.scale().detach()),
        "samples_per_s": len(state.window) * cfg.data.batch_size / elapsed,
    }
    if state.model.logit_bias is not None:
        metrics["logit_bias"] = float(state.model.logit_bias.detach())
    logger.log(state.step, metrics)
    bar.set_postfix(loss=f"{metrics['loss']:.4f}", samples_s=f"{metrics['samples_per_s']:.0f}")
    state.last_loss = metrics["loss"]
    state.window, state.window_start = [], time.perf_counter()
    return metrics


def sampling_options(cfg: TrainConfig, env: DistEnv) -> dict[str, Any]:
    """How batches are drawn (epoch length, resampling, shuffle window, this rank's slice)."""
    return {
        "epoch_samples": cfg.data.epoch_samples,
        "resampled": cfg.data.resampled,
        "window": cfg.data.shuffle_window,
        "rank": env.rank,
        "world_size": env.world_size,
    }


def make_loader(cfg: TrainConfig, model: DualEncoder, start_step: int, env: DistEnv) -> Iterable:
    """The deterministic loader for the run's remaining steps (this rank's slice of each global batch).

    JPEGs are decoded at the smallest DCT scale that still covers the model's input, allowing for the
    smallest random crop, so most of the decoding cost of large images is skipped. With
    ``cache_features`` the batches hold frozen-trunk features instead of images and tokens.
    """
    mixture = open_mixture(cfg.data.train)
    if cfg.cache_features:
        device = next(model.parameters()).device
        image, text = cached_features(
            model,
            mixture.concatenated(),
            cfg.feature_cache_dir,
            workers=cfg.data.workers,
            device=device,
            views=cfg.feature_views,
            rank=env.rank,
            world_size=env.world_size,
        )
        return make_feature_loader(
            mixture,
            image,
            text,
            cfg.data.batch_size,
            cfg.seed,
            start_step,
            cfg.steps - start_step,
            **sampling_options(cfg, env),
        )
    preprocess = preprocess_config(model.cfg)
    side = preprocess.image_size
    if cfg.data.augment:
        side = math.ceil(side / math.sqrt(preprocess.train_scale[0]))
    return make_train_loader(
        mixture,
        image_transform(model.cfg, train=cfg.data.augment),
        batch_tokenizer(model.cfg),
        batch_size=cfg.data.batch_size,
        seed=cfg.seed,
        start_step=start_step,
        num_steps=cfg.steps - start_step,
        workers=cfg.data.workers,
        pin_memory=torch.cuda.is_available(),
        draft=(side, side),
        **sampling_options(cfg, env),
    )


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Train a dual encoder as ``cfg`` says; resumable, checkpointed, logged.

    Args:
        cfg: The run.
        callbacks: Called as ``cb(step, metrics)`` after each step (``metrics`` empty between records).

    Raises:
        TrainingDivergedError: The loss or gradient became NaN/Inf; the last good checkpoint is kept.
    """
    env, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, env, device, callbacks)
    finally:
        distributed.teardown(env)


def _train(cfg: TrainConfig, env: DistEnv, device: torch.device, callbacks: Sequence[Callback]) -> TrainResult:
    distributed.check_batch(cfg.data.batch_size, env)
    with lock_run_dir(Path(cfg.out_dir) / cfg.name, env, device):
        return _train_locked(cfg, env, device, callbacks)


@contextmanager
def lock_run_dir(run_dir: Path, env: DistEnv, device: torch.device) -> Iterator[None]:
    """Hold the run directory's lock (main rank) for the whole run: a second run there is refused.

    Every rank learns whether the main rank got it, so all raise together instead of some waiting.
    """
    lock, problem = FolderLock(run_dir, "a training run"), None
    if env.is_main:
        try:
            lock.acquire()
        except FolderInUseError as exc:
            problem = exc
    failed = distributed.mean_across_ranks(torch.tensor([float(problem is not None)], device=device), env)
    try:
        if problem is not None:
            raise problem
        if float(failed) > 0:
            raise FolderInUseError(f"cannot start a training run in {run_dir}: another process is working there")
        yield
    finally:
        lock.release()


def _train_locked(cfg: TrainConfig, env: DistEnv, device: torch.device, callbacks: Sequence[Callback]) -> TrainResult:
    run_dir = prepare_run_dir(cfg, env)
    state = build_state(cfg, env, device)
    if cfg.resume:
        restore(state, ckpt.resolve_resume(run_dir, cfg.resume))
    logger = MetricLogger(run_dir, cfg.tensorboard, resume_step=state.step if cfg.resume else None, enabled=env.is_main)
    bar = tqdm(
        total=cfg.steps, initial=state.step, desc=cfg.name, unit="step", disable=not (cfg.progress and env.is_main)
    )
    path = ckpt.checkpoint_path(run_dir, state.step)
    state.window, state.window_start = [], time.perf_counter()
    try:
        loader = make_loader(cfg, state.model, state.step, env)
        for images, tokens in loader:  # the step moves them to the device (see backward)
            path = run_one(state, cfg, run_dir, logger, bar, images, tokens, callbacks) or path
    finally:
        bar.close()
        logger.close()
    stats = getattr(loader, "stats", None)
    data = {"lost": dict(stats.lost), "replaced": dict(stats.replaced)} if stats else {}
    if env.is_main:
        summary = json.dumps({"step": state.step, "loss": state.last_loss, "data": data}) + "\n"
        atomic_write_text(run_dir / "summary.json", summary)
    return TrainResult(run_dir, state.step, state.last_loss, path, stats.summary() if stats else "")


def to_device(batch: Any, device: torch.device, cfg: TrainConfig) -> Any:
    """Move a batch part (a tensor, or a record of them: Hugging Face tokens, cached text) to ``device``.

    Floating-point data (images, cached features) become bf16 under ``precision=bf16-pure``.
    """
    if isinstance(batch, TensorRecord):
        return batch.map(lambda t: to_device(t, device, cfg))
    batch = batch.to(device, non_blocking=True)
    return batch.to(torch.bfloat16) if cfg.precision == "bf16-pure" and batch.is_floating_point() else batch


def place_batch(images: torch.Tensor, tokens: Any, device: torch.device, cfg: TrainConfig) -> tuple[torch.Tensor, Any]:
    """A batch (or micro-batch) on ``device``, in the run's dtype and memory format."""
    images, tokens = to_device(images, device, cfg), to_device(tokens, device, cfg)
    if cfg.channels_last and images.ndim == 4:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, tokens


def run_one(
    state: TrainState,
    cfg: TrainConfig,
    run_dir: Path,
    logger: MetricLogger,
    bar: tqdm,
    images: torch.Tensor,
    tokens: torch.Tensor,
    callbacks: Sequence[Callback],
) -> Path | None:
    """One step plus its bookkeeping (records, checkpoints, callbacks); returns a new checkpoint path."""
    state.window.append(train_step(state, cfg, images, tokens))
    bar.update(1)
    last = state.step == cfg.steps
    metrics = log_window(state, cfg, logger, bar) if state.step % cfg.log_every == 0 or last else {}
    path = None
    if state.step % cfg.checkpoint_every == 0 or last:
        if state.window:
            check_window(state)
        path = save(state, cfg, run_dir)
        distributed.barrier(state.env)
    if cfg.eval.every and (state.step % cfg.eval.every == 0 or last) and (cfg.eval.zeroshot or cfg.eval.retrieval):
        device = next(state.model.parameters()).device
        scalars = evaluate_now(state.model, cfg.eval, state.step, run_dir, state.env, device)
        logger.log(state.step, scalars)
        metrics = {**metrics, **scalars}
    for cb in callbacks:
        cb(state.step, metrics)
    return path

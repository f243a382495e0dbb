"""The training loop: one code path from a single CPU process upwards."""

from __future__ import annotations

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
from lipkit.data.prototypes import (
    DEFAULT_TEMPLATES,
    check_images,
    class_captions,
    read_classnames,
    read_definitions,
    read_hypernyms,
)
from lipkit.data.spec import Mixture, open_mixture
from lipkit.errors import ConfigError, FolderInUseError, LipkitError, TrainingDivergedError
from lipkit.losses import LOSSES, create_loss
from lipkit.models import DualEncoder, create_model, image_transform
from lipkit.models.config import get_model_config
from lipkit.models.convert import check_fit
from lipkit.models.factory import batch_tokenizer, check_tokenizer, preprocess_config
from lipkit.models.image_inputs import MixedImages
from lipkit.models.text_inputs import TensorRecord
from lipkit.train import checkpoint as ckpt
from lipkit.train import distributed
from lipkit.train.accumulate import cached_accumulation_backward
from lipkit.train.config import TrainConfig
from lipkit.train.distributed import DistEnv
from lipkit.train.evaluate import evaluate_now
from lipkit.train.feature_cache import cached_features, check_lockable, make_feature_loader, place_prototypes
from lipkit.train.metrics import MetricLogger, recorded_value
from lipkit.train.optim import build_optimizer, lr_at
from lipkit.utils import FolderLock, atomic_write_text, seed_everything, strict_json

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
    bridge: tuple[list[Any], torch.Tensor] | None = None  # class bridge: the class names' tokens and classes

    @property
    def device(self) -> torch.device:
        """Where the model (this rank's shard of it) lives."""
        return next(self.model.parameters()).device


def prepare_run_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    """Create the run directory and save the resolved config; refuse to overwrite a run by accident.

    Temporary files that an interrupted write left there are deleted. Every rank checks (so all raise
    together); only the main rank writes.
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
        ckpt.remove_stale_temporaries(run_dir)
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
    loss_fn = loss_for(cfg, env)
    if loss_fn.needs_bias and model.logit_bias is None:
        raise ConfigError(f"loss {cfg.loss!r} needs a model with a logit bias (init_logit_bias); {cfg.model} has none")
    check_captioning(cfg, model, loss_fn)
    if cfg.cache_features and cfg.fsdp:
        raise ConfigError("cache_features trains only the small heads: use DDP (fsdp=false) across processes")
    if model.cfg.class_bridge and cfg.fsdp:
        raise ConfigError("a class bridge (model_overrides.class_bridge) runs with DDP, not fsdp=true")
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
    state = TrainState(model, loss_fn, optimizer, env, net, cfg.cache_features, replicated)
    if model.cfg.class_bridge:
        state.bridge = bridge_inputs(model, device)
    return state


def bridge_inputs(model: DualEncoder, device: torch.device, batch_size: int = 256) -> tuple[list[Any], torch.Tensor]:
    """The captions of every class name of the model's class bridge (the prototypes' templates,
    ``"a photo of a {name}."``, and with ``class_bridge_definitions`` each class's definition, with
    ``class_bridge_hypernyms`` its WordNet hypernyms), tokenised
    in batches of similar length, and each caption's class in the same order."""
    names = read_classnames(model.cfg.class_bridge)
    if len(names) != model.bridge_head.shape[0]:
        raise ConfigError(
            f"class_bridge {model.cfg.class_bridge!r} names {len(names)} classes, the image tower's classifier "
            f"has {model.bridge_head.shape[0]}"
        )
    glosses = read_definitions(model.cfg.class_bridge) if model.cfg.class_bridge_definitions else ()
    form = model.cfg.class_bridge_hypernyms
    broader = read_hypernyms(model.cfg.class_bridge) if form else ()
    pairs = class_captions(names, DEFAULT_TEMPLATES, definitions=glosses, hypernyms=broader, hypernym_form=form)
    captions = sorted(pairs, key=lambda pair: len(pair[1]))
    tokenize = batch_tokenizer(model.cfg)  # trims each batch's shared padding
    chunks = [
        tokenize([text for _, text in captions[i : i + batch_size]]).to(device)
        for i in range(0, len(captions), batch_size)
    ]
    return chunks, torch.tensor([c for c, _ in captions], device=device)


def refresh_bridge(state: TrainState) -> None:
    """Recompute the class bridge's text embeddings from the text tower's current weights."""
    if state.bridge is not None:
        state.model.refresh_bridge(*state.bridge)


def check_captioning(cfg: TrainConfig, model: DualEncoder, loss_fn: nn.Module) -> None:
    """A captioning model (CoCa) trains with the ``coca`` loss, on whole images and texts its decoder can predict."""
    captions = bool(getattr(loss_fn, "needs_captions", False))
    decoder = model.cfg.decoder_config()
    if captions and decoder is None:
        raise ConfigError(f"loss {cfg.loss!r} trains a captioning decoder; {cfg.model} has none (try a coca_* model)")
    if decoder is None:
        return
    if not captions:
        raise ConfigError(
            f"{cfg.model} has a captioning decoder: train it with loss 'coca' (its caption_weight and "
            "contrastive_weight options set the mix)"
        )
    if cfg.cache_features:
        raise ConfigError(
            "cache_features trains only the heads, but CoCa's decoder reads the image tokens: turn it off"
        )
    if cfg.accum_micro_batch is not None:
        raise ConfigError("accum_micro_batch caches embeddings only, not the decoder's inputs: CoCa trains without it")
    text = model.cfg.text_config()
    vocab = getattr(text, "vocab_size", None)
    if vocab is None and hasattr(model.text, "encoder"):  # a Hugging Face tower: its model's vocabulary
        vocab = model.text.encoder.config.vocab_size
    if vocab is not None and vocab > decoder.vocab_size:
        raise ConfigError(
            f"the decoder predicts {decoder.vocab_size} tokens but the text vocabulary has {vocab}: captions holding "
            f"later ids cannot be learned; set model_overrides.decoder.vocab_size={vocab}"
        )


def compile_backend(setting: str | None, device: torch.device) -> str | None:
    """The ``torch.compile`` backend for the ``compile`` setting on ``device``, or ``None`` for eager.

    ``auto`` compiles with inductor on CUDA only: there it fuses the elementwise work between the
    matrix products, while on CPUs compiling takes long and the step gets slower (docs/benchmarks.md,
    "Training step on CPU").
    """
    if setting == "auto":
        return "inductor" if device.type == "cuda" else None
    return setting or None


def load_resume(cfg: TrainConfig, run_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint that ``cfg.resume`` names and its contents, checked against ``cfg``; None for a new run.

    Raises:
        CheckpointError: It is missing or unreadable, or was trained with another model or seed (unless
            ``resume_force``).
        ConfigError: It is past ``cfg.steps``.
    """
    if not cfg.resume:
        return None
    path = ckpt.resolve_resume(run_dir, cfg.resume)
    saved = ckpt.load_checkpoint(path)
    ckpt.check_resume(saved, cfg, path)
    return path, saved


def restore(state: TrainState, path: Path, saved: dict[str, Any]) -> None:
    """Load model, optimizer, step and random generators from checkpoint ``path``, read as ``saved``.

    Raises:
        CheckpointError: Its weights do not fit the model (missing, unexpected and mis-shaped keys listed).
    """
    check_fit(state.model.state_dict(), saved["model"], f"resume: {path} does not fit the model")
    sharded = bool(state.replicated)
    distributed.load_full_state(state.model, state.optimizer, saved["model"], saved["optimizer"], sharded)
    state.step = int(saved["step"])
    ckpt.set_rng_state(saved["rng"])


def save(state: TrainState, cfg: TrainConfig, run_dir: Path) -> Path:
    """Write a checkpoint for the current step (main rank) and prune old ones; every rank calls it.

    Raises:
        TrainingDivergedError: A weight is NaN or infinite: no checkpoint is written.
    """
    check_weights(state)
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


def check_weights(state: TrainState) -> None:
    """Stop the run if the last update made a weight NaN or infinite (every rank raises together).

    The loss and gradients of a step can be finite while its update is not (an extreme learning rate):
    only the weights show it, so they are checked before each checkpoint.
    """
    local = [p.to_local() if hasattr(p, "to_local") else p for p in state.model.parameters()]  # FSDP: own shard
    finite = torch.stack([torch.isfinite(t.detach()).all() for t in local]).all()
    if float(distributed.mean_across_ranks((~finite).float().reshape(1), state.env)) > 0:
        raise TrainingDivergedError(f"the weights became NaN or infinite in the update of step {state.step}")


def last_good_checkpoint(run_dir: Path) -> str:
    """What a stopped run leaves to resume from, in words."""
    found = ckpt.list_checkpoints(run_dir)
    return f"the last good checkpoint, {found[-1]}, is kept" if found else "no checkpoint was written"


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
            f"the loss or gradient became {stats[bad - state.step - 1].tolist()} (loss, grad norm) at step {bad}"
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


def make_loader(cfg: TrainConfig, mixture: Mixture, model: DualEncoder, start_step: int, env: DistEnv) -> Iterable:
    """The deterministic loader for the run's remaining steps (this rank's slice of each global batch).

    JPEGs are decoded at the smallest DCT scale that still covers the model's input, allowing for the
    smallest random crop, so most of the decoding cost of large images is skipped. With
    ``cache_features`` the batches hold frozen-trunk features instead of images and tokens.
    """
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
    place_prototypes(model, mixture.sources, device=next(model.parameters()).device, workers=cfg.data.workers)
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
        TrainingDivergedError: The loss, a gradient or a weight became NaN/Inf; the last good checkpoint is kept.
        LipkitError: The config, the data or the device is unusable (found before anything is written), or
            the checkpoint to resume from does not match the run.
    """
    env, device = distributed.setup(cfg.device)
    try:
        return _train(cfg, env, device, callbacks)
    finally:
        distributed.teardown(env)


def _train(cfg: TrainConfig, env: DistEnv, device: torch.device, callbacks: Sequence[Callback]) -> TrainResult:
    distributed.check_batch(cfg.data.batch_size, env)
    mixture = open_inputs(cfg)
    with lock_run_dir(Path(cfg.out_dir) / cfg.name, env, device):
        return _train_locked(cfg, env, device, callbacks, mixture)


def open_inputs(cfg: TrainConfig) -> Mixture:
    """Check the model and the loss, and open the data, before anything of the run is written.

    Raises:
        LipkitError: An unknown model or loss, or data that cannot be opened (an unknown source, a
            pattern that matches no file...).
    """
    get_model_config(cfg.model, **cfg.model_overrides)
    check_tokenizer(cfg.model, **cfg.model_overrides)
    LOSSES.get(cfg.loss)
    try:
        mixture = open_mixture(cfg.data.train)
    except LipkitError as exc:
        raise ConfigError(f"data.train: {exc}") from None
    check_images(mixture.sources, get_model_config(cfg.model, **cfg.model_overrides).lock_image)
    return mixture


@contextmanager
def lock_run_dir(run_dir: Path, env: DistEnv, device: torch.device) -> Iterator[None]:
    """Hold the run directory's lock (main rank) for the whole run: a second run there is refused.

    Every rank learns whether the main rank got it, so all raise together instead of some waiting.
    """
    lock, problem = FolderLock(run_dir, "a training run"), None
    if env.is_main:
        try:
            lock.acquire()
        except LipkitError as exc:  # busy, or the folder cannot be written
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


def _train_locked(
    cfg: TrainConfig, env: DistEnv, device: torch.device, callbacks: Sequence[Callback], mixture: Mixture
) -> TrainResult:
    resumed = load_resume(cfg, Path(cfg.out_dir) / cfg.name)  # before anything in the run directory changes
    run_dir = prepare_run_dir(cfg, env)
    state = build_state(cfg, env, device)
    if resumed is not None:
        restore(state, *resumed)
        if env.is_main:  # the result when no step is left to run
            state.last_loss = recorded_value(run_dir, state.step, "loss")
    logger = MetricLogger(run_dir, cfg.tensorboard, resume_step=state.step, enabled=env.is_main)
    bar = tqdm(
        total=cfg.steps, initial=state.step, desc=cfg.name, unit="step", disable=not (cfg.progress and env.is_main)
    )
    try:
        path, stats = run_steps(state, cfg, run_dir, logger, bar, mixture, callbacks)
    except TrainingDivergedError as exc:
        raise TrainingDivergedError(
            f"{exc}; {last_good_checkpoint(run_dir)}. Lower optim.lr, set optim.grad_clip, or use precision=fp32."
        ) from None
    finally:
        bar.close()
        logger.close()
    if env.is_main:
        write_summary(run_dir, state, stats)
    return TrainResult(run_dir, state.step, state.last_loss, path, stats.summary() if stats else "")


def run_steps(
    state: TrainState,
    cfg: TrainConfig,
    run_dir: Path,
    logger: MetricLogger,
    bar: tqdm,
    mixture: Mixture,
    callbacks: Sequence[Callback],
) -> tuple[Path, Any]:
    """Train the remaining steps; returns the last checkpoint and the loader's data counts (None if it has none)."""
    path = ckpt.checkpoint_path(run_dir, state.step)
    state.window, state.window_start = [], time.perf_counter()
    loader = make_loader(cfg, mixture, state.model, state.step, state.env)
    if state.step == 0:  # a resumed run has its checkpoint's class embeddings, refreshed when it was saved
        refresh_bridge(state)
    for images, tokens in loader:  # the step moves them to the device (see backward)
        images = MixedImages.from_batch(images)  # a batch with classifier prototypes
        path = run_one(state, cfg, run_dir, logger, bar, images, tokens, callbacks) or path
    return path, getattr(loader, "stats", None)


def write_summary(run_dir: Path, state: TrainState, stats: Any) -> None:
    """Write ``summary.json``: the step, the last loss (``null`` when none was recorded) and the data counts."""
    data = (
        {"lost": dict(stats.lost), "replaced": dict(stats.replaced), "caption_fallbacks": stats.caption_fallbacks}
        if stats
        else {}
    )
    summary = {"step": state.step, "loss": state.last_loss, "data": data}
    atomic_write_text(run_dir / "summary.json", strict_json(summary) + "\n")


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
    if cfg.channels_last and isinstance(images, torch.Tensor) and images.ndim == 4:
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
        refresh_bridge(state)  # the checkpoint's class embeddings match its text tower (and a resumed run's)
        path = save(state, cfg, run_dir)
        distributed.barrier(state.env)
    elif state.step % cfg.bridge_every == 0:
        refresh_bridge(state)  # for the next steps
    if cfg.eval.every and (state.step % cfg.eval.every == 0 or last) and (cfg.eval.zeroshot or cfg.eval.retrieval):
        device = next(state.model.parameters()).device
        scalars = evaluate_now(state.model, cfg.eval, state.step, run_dir, state.env, device)
        logger.log(state.step, scalars)
        metrics = {**metrics, **scalars}
    for cb in callbacks:
        cb(state.step, metrics)
    return path

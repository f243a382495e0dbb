"""Training configuration: typed dataclasses, named presets, YAML files and ``key=value`` overrides."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from lipkit.config import from_dict, load_yaml, merge, parse_overrides
from lipkit.errors import ConfigError
from lipkit.registry import Registry

PRESETS: Registry[dict[str, Any]] = Registry("training preset")


@dataclass
class DataConfig:
    """What to train on.

    Attributes:
        train: Data spec (see :mod:`lipkit.data.spec`): ``synthetic``, ``tuxpaint:train``, ``emoji:train``,
            webdataset shards ``/data/{00000..00099}.tar``, a folder, a CSV/Parquet table, or several
            comma-separated (or as a list) with ``::WEIGHT`` mixing weights.
        batch_size: Global batch size (split evenly across ranks).
        workers: DataLoader worker processes (0 loads in the main process).
        augment: Random resized crop for training images (else the evaluation transform).
        epoch_samples: Samples per epoch (OpenCLIP's ``train_num_samples``); default all the data.
        resampled: Draw samples with replacement (by weight, then uniformly) instead of in epochs.
        shuffle_window: Shards whose samples are shuffled together (shards themselves are shuffled too).
    """

    train: str | list[Any] = "synthetic"
    batch_size: int = 64
    workers: int = 0
    augment: bool = True
    epoch_samples: int | None = None
    resampled: bool = False
    shuffle_window: int = 4

    def validate(self) -> None:
        from lipkit.data.spec import parse_spec
        from lipkit.errors import LipkitError

        if self.batch_size < 1:
            raise ConfigError(f"data.batch_size must be positive, got {self.batch_size}")
        if self.workers < 0:
            raise ConfigError(f"data.workers must be >= 0, got {self.workers}")
        if self.epoch_samples is not None and self.epoch_samples < self.batch_size:
            raise ConfigError(f"data.epoch_samples must be at least one batch ({self.batch_size})")
        if self.shuffle_window < 1:
            raise ConfigError(f"data.shuffle_window must be at least 1, got {self.shuffle_window}")
        try:
            parse_spec(self.train)
        except LipkitError as exc:
            raise ConfigError(f"data.train: {exc}") from None


@dataclass
class EvalConfig:
    """Evaluation during training (split across ranks under torchrun).

    Attributes:
        every: Steps between evaluations (also after the last step); 0 turns them off.
        zeroshot: Labelled sets for zero-shot top-1 (e.g. ``fashion-mnist:test``).
        retrieval: Pair sources for retrieval Recall@k (e.g. ``tuxpaint:test``).
        max_samples: Images used from each labelled set (a fixed subset); ``None`` uses all.
    """

    every: int = 0
    zeroshot: list[str] = field(default_factory=list)
    retrieval: list[str] = field(default_factory=list)
    max_samples: int | None = 1000

    def validate(self) -> None:
        if self.every < 0:
            raise ConfigError(f"eval.every must be >= 0, got {self.every}")


@dataclass
class OptimConfig:
    """AdamW with warmup and a decaying schedule.

    Attributes:
        lr: Peak learning rate.
        weight_decay: Decoupled weight decay (never applied to norms, biases, embeddings, the temperature).
        betas: Adam betas.
        eps: Adam epsilon.
        warmup_steps: Linear warmup from 0 to ``lr``.
        schedule: ``cosine`` (to ``min_lr``), ``linear`` (to ``min_lr``) or ``constant`` after warmup.
        min_lr: Final learning rate of the decay.
        grad_clip: Clip the global gradient norm to this value; ``None`` disables clipping.
    """

    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    schedule: str = "cosine"
    min_lr: float = 0.0
    grad_clip: float | None = 1.0

    def validate(self) -> None:
        if self.schedule not in ("cosine", "linear", "constant"):
            raise ConfigError(f"optim.schedule must be cosine, linear or constant, got {self.schedule!r}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")


@dataclass
class TrainConfig:
    """A training run. Saved as ``config.yaml`` in the run directory, so every run can be reproduced.

    Attributes:
        name: Run name; the run directory is ``out_dir/name``.
        out_dir: Parent folder of run directories.
        model: Model config name (``lipkit models`` lists them) or a JSON file.
        model_overrides: Nested overrides of the model config, e.g. ``{vision: {layers: 2}}``.
        pretrained: Weights to start from (lipkit, OpenCLIP or OpenAI checkpoint).
        loss: ``infonce`` (CLIP), ``siglip`` (sigmoid), or their O(B x tile)-memory forms
            ``infonce-streaming`` / ``siglip-streaming``.
        loss_options: Keyword arguments of the loss, e.g. ``{tile: 2048}`` for the streaming losses.
        steps: Optimizer steps.
        precision: ``fp32``, ``bf16`` (autocast: bf16 matmuls, fp32 weights) or ``bf16-pure`` (weights,
            gradients and optimizer state in bf16: half the memory, less precise updates).
        seed: Seed for initialisation, data order and augmentation.
        device: ``auto``, ``cpu``, ``cuda``, ``cuda:1``...
        log_every: Steps between metric records.
        checkpoint_every: Steps between checkpoints (a final one is always written).
        keep_checkpoints: How many step checkpoints to keep (older ones are deleted).
        resume: ``latest`` (this run's newest checkpoint) or a checkpoint path. A checkpoint of another
            model or seed is refused, as is one past ``steps``.
        resume_force: Resume even from a checkpoint trained with another model config or seed (its weights
            must still fit the model).
        overwrite: Start afresh in a run directory that already holds checkpoints (deleting them).
        tensorboard: Also write TensorBoard event files.
        progress: Show a progress bar.
        grad_checkpointing: Recompute activations in the backward pass (less memory, more compute).
        cache_features: Compute the frozen trunks' features once (both towers must be locked), cache them
            on disk, and train only the projection heads on them (LiT): re-runs take seconds.
        feature_cache_dir: Where cached features live (default ``$LIPKIT_CACHE_DIR/features`` or
            ``~/.cache/lipkit/features``).
        feature_views: With ``cache_features``, how many views of each training image are cached: the
            evaluation view and ``feature_views - 1`` draws of the training augmentation (random crop,
            ``model_overrides.preprocess.train_grayscale``), each seeded by (sample, view); every step
            uses one view per sample, chosen by the sample's seed. Each view is its own cache entry,
            so raising the number reuses the views already cached.
        bridge_every: With a class bridge (``model_overrides.class_bridge``), recompute the class names'
            text embeddings every this many steps (and at every checkpoint), from the text tower as it
            trains.
        compile: Compile the forward pass with ``torch.compile`` using this backend. ``auto`` (the
            default) compiles with ``inductor`` on CUDA devices, where it pays off, and runs eagerly
            elsewhere (on CPUs compiling takes long and the step gets slower: docs/benchmarks.md); under
            ``auto`` a part that fails to compile runs eagerly with a warning instead of stopping the
            run. ``None`` always runs eagerly; any other name (``inductor``, ``aot_eager``...) always
            compiles with that backend.
        fsdp: Under torchrun, shard parameters, gradients and optimizer state over the processes (FSDP2)
            instead of replicating the model (DDP): for towers too large for one device.
        channels_last: Keep images and convolution weights in channels-last memory format (faster
            convolutional image towers on GPUs and recent CPUs).
        accum_micro_batch: Run each batch as micro-batches of this size through a feature cache: the
            gradients of the full batch with the activation memory of one micro-batch.
        data: Data settings.
        optim: Optimizer settings.
        eval: Evaluation during training.
    """

    name: str = "run"
    out_dir: str = "runs"
    model: str = "tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    loss: str = "infonce"
    loss_options: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    precision: str = "fp32"
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    resume: str | None = None
    resume_force: bool = False
    overwrite: bool = False
    tensorboard: bool = True
    progress: bool = True
    grad_checkpointing: bool = False
    compile: str | None = "auto"
    channels_last: bool = False
    fsdp: bool = False
    accum_micro_batch: int | None = None
    cache_features: bool = False
    feature_cache_dir: str | None = None
    feature_views: int = 1
    bridge_every: int = 10
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> None:
        if self.precision not in ("fp32", "bf16", "bf16-pure"):
            raise ConfigError(f"precision must be fp32, bf16 or bf16-pure, got {self.precision!r}")
        if self.feature_views != 1 and not self.cache_features:
            raise ConfigError("feature_views applies to cached features: set cache_features=true")
        for key in ("steps", "log_every", "checkpoint_every", "keep_checkpoints", "feature_views", "bridge_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")


def resolve_config(
    preset: str | None = None, config_file: str | None = None, overrides: Sequence[str] = ()
) -> TrainConfig:
    """Build a :class:`TrainConfig`: defaults < preset < YAML file < ``key=value`` overrides.

    Raises:
        ConfigError: An unknown key (with a suggestion), a value of the wrong type, a bad override.
        UnknownNameError: An unknown preset (with the closest names).
    """
    data: dict[str, Any] = {}
    if preset:
        data = merge(data, PRESETS.get(preset))
    if config_file:
        data = merge(data, load_yaml(config_file))
    return from_dict(TrainConfig, merge(data, parse_overrides(overrides)))


PRESETS.add(
    "tiny-synthetic",
    {
        "name": "tiny-synthetic",
        "model": "micro",
        "steps": 30,
        "log_every": 5,
        "checkpoint_every": 10,
        "data": {"train": "synthetic", "batch_size": 16},
        "optim": {"lr": 1e-3, "warmup_steps": 5, "weight_decay": 0.1},
    },
)
PRESETS.add(
    "tiny-coca",
    {
        "name": "tiny-coca",
        "model": "tiny-coca",
        "loss": "coca",
        "steps": 300,
        "log_every": 10,
        "checkpoint_every": 100,
        "data": {"train": "tuxpaint:train", "batch_size": 32, "workers": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 30, "weight_decay": 0.1},
    },
)
PRESETS.add(
    "tiny-tuxpaint",
    {
        "name": "tiny-tuxpaint",
        "model": "tiny",
        "steps": 300,
        "log_every": 10,
        "checkpoint_every": 100,
        "data": {"train": "tuxpaint:train", "batch_size": 64, "workers": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 30, "weight_decay": 0.1},
    },
)
PRESETS.add(
    "vit-b-32",
    {
        "name": "vit-b-32",
        "model": "ViT-B-32",
        "steps": 100_000,
        "precision": "bf16",
        "log_every": 50,
        "checkpoint_every": 2000,
        "data": {"batch_size": 1024, "workers": 8},
        "optim": {"lr": 5e-4, "warmup_steps": 2000, "weight_decay": 0.2},
    },
)
PRESETS.add(
    "vit-b-16-siglip",
    {
        "name": "vit-b-16-siglip",
        "model": "ViT-B-16-SigLIP",
        "loss": "siglip",
        "steps": 100_000,
        "precision": "bf16",
        "log_every": 50,
        "checkpoint_every": 2000,
        "data": {"batch_size": 512, "workers": 8},
        "optim": {"lr": 1e-3, "warmup_steps": 2000, "weight_decay": 1e-4, "betas": [0.9, 0.95]},
    },
)
PRESETS.add(
    "lit-quickstart",
    {
        "name": "lit",
        "model": "lit-effnet-minilm",
        # chosen on validation over 5 seeds (docs/quickstart_recipes.md): the top MiniLM layer trains on
        # cached text states, 3 augmented views per training image (half of them greyed) are cached, the
        # shared space is 512-d, and 30% of each batch are the image tower's ImageNet classifier rows as
        # pairs (classifier prototypes, scaled to the mean feature norm, captioned with CLIP's class name,
        # every WordNet synonym and every WordNet hypernym), Tux Paint and emoji keeping their 36:64 ratio;
        # each image embedding adds the text embeddings of the ImageNet classes the tower's classifier sees
        # in it (class bridge: names and hypernyms, their embeddings recomputed every 50 steps)
        "model_overrides": {
            "embed_dim": 512,
            "unlock_text_layers": 1,
            "preprocess": {"train_grayscale": 0.5},
            "class_bridge": "imagenet-1k-both",
            "class_bridge_hypernyms": "name",
        },
        "cache_features": True,
        "feature_views": 4,
        "bridge_every": 50,
        "steps": 150,
        "log_every": 10,
        "checkpoint_every": 150,
        "keep_checkpoints": 1,
        "data": {
            "train": [
                "tuxpaint:train::0.252",
                "emoji:train::0.448",
                {
                    "source": "prototypes",
                    "weight": 0.3,
                    "options": {"placement": "norm", "classnames": "imagenet-1k-both", "hypernyms": "name"},
                },
            ],
            "batch_size": 256,
            "workers": 2,
        },
        "optim": {"lr": 1e-3, "warmup_steps": 20, "weight_decay": 0.05},
    },
)
PRESETS.add(
    "tiny-quickstart",
    {
        "name": "tiny",
        "model": "tiny",
        "steps": 300,
        "log_every": 10,
        "checkpoint_every": 300,
        "keep_checkpoints": 1,
        "data": {"train": "tuxpaint:train,emoji:train", "batch_size": 64, "workers": 2},
        "optim": {"lr": 1e-3, "warmup_steps": 30, "weight_decay": 0.1},
    },
)

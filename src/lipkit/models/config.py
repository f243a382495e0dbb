"""Model architectures as data: named JSON configs in ``models/configs/`` and their typed schema."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from lipkit.config import from_dict, merge
from lipkit.errors import ConfigError, UnknownNameError, suggest
from lipkit.registry import Registry

ACTIVATIONS = ("gelu", "quick_gelu", "gelu_tanh")

# Tower types, the ``type`` of a model config's ``vision`` or ``text`` entry, each registered as its config
# class. A config class names the tower it builds in ``tower`` ("module:Class"), imported only when a model
# is built (:func:`lipkit.models.towers.build_tower`), so reading configs needs no torch.
VISION_TOWERS: Registry[type] = Registry("image tower")
TEXT_TOWERS: Registry[type] = Registry("text tower")


@VISION_TOWERS.register("vit")
@dataclass
class ViTConfig:
    """A Vision Transformer image tower (pre-norm blocks, SDPA attention).

    Attributes:
        image_size: Input resolution (square).
        patch_size: Side of the square patches.
        width: Token width.
        layers: Number of transformer blocks.
        heads: Attention heads per block.
        mlp_ratio: Hidden width of the MLP relative to ``width``.
        act: ``gelu``, ``quick_gelu`` (OpenAI's original checkpoints) or ``gelu_tanh``.
        class_token: Prepend a learned class token.
        pool: ``cls`` (class token), ``mean`` (mean of patch tokens), ``map`` (attention pooling with a
            learned query, as in SigLIP) or ``queries`` (OpenCLIP's CoCa pooler: ``pool_queries`` learned
            queries attend over the tokens into ``embed_dim`` wide outputs, normalised; the first is the
            pooled feature, the others are the image tokens a captioning decoder reads).
        pool_queries: Number of learned queries of the ``queries`` pooler.
        pool_heads: Attention heads of the ``queries`` pooler.
        ln_pre: LayerNorm after the embeddings, before the blocks (CLIP has it, SigLIP does not).
        patch_bias: Bias in the patch-embedding convolution.
        qkv_bias: Bias in the attention input projection.
        norm_eps: LayerNorm epsilon.
        layer_scale_init: Initial value of per-channel residual scales; ``None`` disables them.
        proj: Project the pooled feature to ``embed_dim`` with a linear layer (else it must equal width).
        proj_bias: Bias in that projection.
        patch_dropout: Fraction of patch tokens dropped at training time (FLIP); 0 disables it.
        norm_after_pool: Apply the final LayerNorm to the pooled feature instead of to every token
            (OpenCLIP's ``final_ln_after_pool``, as CLIPA's average-pooled towers do).
        openclip_layout: The key layout of this tower in OpenCLIP checkpoints: ``openclip`` (OpenCLIP's own
            ViT: ``visual.conv1``, ``visual.transformer.resblocks``...) or ``timm`` (a timm ViT trunk,
            ``visual.trunk.*``, as OpenCLIP's SigLIP models hold it). Import and export follow it.
    """

    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    class_token: bool = True
    pool: str = "cls"
    ln_pre: bool = True
    patch_bias: bool = False
    qkv_bias: bool = True
    norm_eps: float = 1e-5
    layer_scale_init: float | None = None
    proj: bool = True
    proj_bias: bool = False
    patch_dropout: float = 0.0
    norm_after_pool: bool = False
    openclip_layout: str = "openclip"
    pool_queries: int = 256
    pool_heads: int = 8

    tower: ClassVar[str] = "lipkit.models.vit:VisionTransformer"

    def validate(self) -> None:
        if self.image_size < self.patch_size:  # else the grid is image_size // patch_size (a remainder is cropped)
            raise ConfigError(f"vision.image_size {self.image_size} is smaller than patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"vision.width {self.width} is not divisible by heads {self.heads}")
        _check_choice("vision.act", self.act, ACTIVATIONS)
        _check_choice("vision.pool", self.pool, ("cls", "mean", "map", "queries"))
        if self.pool == "queries" and (self.pool_queries < 1 or self.pool_heads < 1):
            raise ConfigError("vision.pool 'queries' needs pool_queries >= 1 and pool_heads >= 1")
        if self.pool == "cls" and not self.class_token:
            raise ConfigError("vision.pool 'cls' needs class_token: true")
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"vision.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        _check_choice("vision.openclip_layout", self.openclip_layout, ("openclip", "timm"))
        if self.norm_after_pool and self.pool in ("map", "queries"):
            raise ConfigError(f"vision.norm_after_pool does not apply to attention pooling ({self.pool!r})")


@VISION_TOWERS.register("resnet")
@dataclass
class ResNetConfig:
    """OpenAI's modified ResNet image tower (CLIP's RN50, RN101, RN50x4...).

    Three stem convolutions with an average pool, four stages of bottleneck blocks that downsample
    with an average pool before the strided path, and attention pooling over the final feature map whose
    query is the mean of the map.

    Attributes:
        image_size: Input resolution (square), a multiple of 32.
        layers: Bottleneck blocks in each of the four stages.
        width: Channels after the stem; stage ``i`` has ``width * 2**i`` bottleneck channels, four times
            that at its output, so the final map has ``width * 32`` channels.
        head_width: Channels per head of the attention pool (its heads: ``width * 32 // head_width``).
        channels_last: Feed images to the convolutions in channels-last memory format (faster on CPUs;
            ``benchmarks/tower_features.py --tower rn50``); the values agree with the default layout to
            rounding.
        fold_batchnorm: Run each eval-mode BatchNorm folded into the convolution before it whenever
            no gradient flows into them (:mod:`lipkit.models.folding`), as timm towers do.
    """

    image_size: int = 224
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    head_width: int = 64
    channels_last: bool = True
    fold_batchnorm: bool = True

    tower: ClassVar[str] = "lipkit.models.resnet:ModifiedResNet"
    openclip_layout: ClassVar[str] = "resnet"

    def validate(self) -> None:
        if self.image_size % 32:
            raise ConfigError(f"vision.image_size {self.image_size} is not a multiple of 32")
        if (self.width * 32) % self.head_width:
            raise ConfigError(f"vision.width * 32 = {self.width * 32} is not divisible by head_width {self.head_width}")


@VISION_TOWERS.register("timm")
@dataclass
class TimmConfig:
    """Any timm image model by name, with a projection head.

    Attributes:
        name: timm model name (e.g. ``efficientnet_lite0``, ``resnet50``).
        image_size: Input resolution used by the transforms.
        pretrained: Optional path to a local state dict for the timm model (nothing is downloaded).
        pool: timm global pooling (``avg``, ``max``, ``token``, ``map``...), or ``""`` to keep timm's default.
        proj: ``linear``, ``mlp`` (two layers with GELU), ``none`` (feature width must equal embed_dim) or
            ``classifier``: timm's own classifier head, built with ``embed_dim`` outputs, is the projection
            (OpenCLIP's timm towers with no projection of their own: EVA, MobileCLIP, Perception Encoder).
        proj_bias: Bias in the linear projection.
        proj_hidden: Hidden width of the ``mlp`` projection; ``None`` takes the mean of the feature width
            and ``embed_dim`` (OpenCLIP's timm towers use twice ``embed_dim``).
        mlp_bias: Bias in each of the two layers of the ``mlp`` projection (OpenCLIP's timm towers: the
            output layer's from its ``proj_bias``).
        key_map: ``ordered`` maps a state dict whose keys differ from timm's onto timm's in order, by
            shape (for weight files saved by other EfficientNet/ResNet implementations); ``exact`` does not.
        channels_last: Feed images to the trunk in channels-last memory format, which convolution kernels
            run faster on (docs/benchmarks.md, "Frozen image tower"); the values agree with the default
            layout to rounding.
        fold_batchnorm: Run each eval-mode BatchNorm folded into the convolution before it
            (:mod:`lipkit.models.folding`) whenever no gradient flows into them (a frozen trunk, or
            evaluation): 1.36x as fast for EfficientNet-Lite0 on a 2-core CPU (docs/benchmarks.md); the
            values agree to rounding.
    """

    name: str = "resnet18"
    image_size: int = 224
    pretrained: str | None = None
    pool: str = "avg"
    proj: str = "linear"
    proj_bias: bool = False
    proj_hidden: int | None = None
    mlp_bias: tuple[bool, bool] = (True, True)
    key_map: str = "exact"
    channels_last: bool = True
    fold_batchnorm: bool = True

    tower: ClassVar[str] = "lipkit.models.timm_tower:TimmTower"
    # OpenCLIP holds a timm tower as ``visual.trunk.*`` (the same names) and ``visual.head.{proj,mlp}.*``
    openclip_layout: ClassVar[str] = "timm-model"

    def validate(self) -> None:
        _check_choice("vision.proj", self.proj, ("linear", "mlp", "none", "classifier"))
        if self.proj_hidden is not None and self.proj_hidden < 1:
            raise ConfigError(f"vision.proj_hidden must be positive, got {self.proj_hidden}")
        _check_choice("vision.key_map", self.key_map, ("exact", "ordered"))


@TEXT_TOWERS.register("transformer")
@dataclass
class TextTransformerConfig:
    """The CLIP text transformer (causal by default, EOT pooling) or a bidirectional variant.

    Attributes:
        context_length: Maximum number of tokens, including start and end tokens.
        vocab_size: Token embedding rows.
        width: Token width.
        heads: Attention heads per block.
        layers: Number of transformer blocks.
        mlp_ratio: Hidden width of the MLP relative to ``width``.
        act: ``gelu``, ``quick_gelu`` or ``gelu_tanh``.
        causal: Causal attention mask (CLIP); ``False`` gives a bidirectional encoder (SigLIP).
        pool: ``eot`` (the end-of-text token, found as the largest token id as in CLIP), ``eos`` (the
            first ``eos_id`` token, for vocabularies whose end token is not the largest id), ``last``,
            ``first`` or ``mean`` (over non-padding tokens).
        norm_eps: LayerNorm epsilon.
        proj: Project the pooled feature to ``embed_dim`` with a linear layer (else ``width`` must equal it).
        proj_bias: Bias in the output projection.
        pad_id: Padding token id (used by ``mean`` pooling, and masked out by ``embed_cls`` towers).
        eos_id: End-of-text token id (used by ``eos`` pooling).
        embed_cls: Append a learned class token after the text (CoCa): it pools (``pool`` must be
            ``last``), the final norm applies to it alone, and the token states before it, not normalised,
            are what a captioning decoder reads. Padding is masked out as a key.
        correct_cls_mask: With ``embed_cls``, mask each padding position itself. OpenCLIP's CoCa weights
            were trained with the mask shifted one position to the right (a padding position is masked
            where the token before it is padding, and the first padding position stays visible), which is
            the default here too, so that those weights give the same features.
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    heads: int = 8
    layers: int = 12
    mlp_ratio: float = 4.0
    act: str = "gelu"
    causal: bool = True
    pool: str = "eot"
    norm_eps: float = 1e-5
    proj: bool = True
    proj_bias: bool = False
    pad_id: int = 0
    eos_id: int = 2
    embed_cls: bool = False
    correct_cls_mask: bool = False

    tower: ClassVar[str] = "lipkit.models.text:TextTransformer"

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"text.width {self.width} is not divisible by heads {self.heads}")
        _check_choice("text.act", self.act, ACTIVATIONS)
        _check_choice("text.pool", self.pool, ("eot", "eos", "last", "first", "mean"))
        if self.embed_cls and self.pool != "last":
            raise ConfigError(f"text.embed_cls pools the appended class token: set pool 'last', not {self.pool!r}")


@dataclass
class DecoderConfig:
    """CoCa's multimodal text decoder: causal self-attention over the text tower's token states, then
    cross-attention to the image tokens, in each of ``layers`` blocks, and a linear head onto the vocabulary.

    Attributes:
        width: Token width; the text tower's and the image tokens' width must equal it.
        layers: Number of blocks (each a self-attention and a cross-attention block).
        heads: Attention heads.
        mlp_ratio: Hidden width of each block's MLP relative to ``width``.
        act: ``gelu``, ``quick_gelu`` or ``gelu_tanh``.
        vocab_size: Outputs of the head: the tokens it predicts.
        context_length: Longest text it reads.
        norm_eps: LayerNorm epsilon.
        layer_scale_init: Initial value of per-channel residual scales; ``None`` disables them.
    """

    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    act: str = "gelu"
    vocab_size: int = 49408
    context_length: int = 76
    norm_eps: float = 1e-5
    layer_scale_init: float | None = None

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"decoder.width {self.width} is not divisible by heads {self.heads}")
        _check_choice("decoder.act", self.act, ACTIVATIONS)
        if self.layers < 1 or self.vocab_size < 2:
            raise ConfigError("decoder needs layers >= 1 and vocab_size >= 2")


@TEXT_TOWERS.register("hf")
@dataclass
class HFTextConfig:
    """A Hugging Face text encoder from a local directory (nothing is downloaded).

    Attributes:
        path: Directory holding ``config.json``, the weights and the tokenizer files; ``pkg:NAME/sub``
            resolves a folder inside an installed Python package.
        from_config: Build the encoder from ``config.json`` alone, with fresh weights (for a model whose
            weights come from a CLIP checkpoint, as OpenCLIP's RoBERTa, XLM-RoBERTa, mT5 and NLLB towers
            do: lipkit ships their configs). Encoder-decoder models (mT5, NLLB) keep their encoder only.
        config_overrides: Values that replace those of ``config.json`` (e.g. ``{"num_hidden_layers": 6}``).
        context_length: Maximum number of tokens.
        pool: ``mean`` (over non-padding tokens), ``cls`` (first token) or ``eot`` (last non-padding token).
        proj: ``linear``, ``mlp`` or ``none``.
        proj_bias: Bias in the linear projection.
        mlp_bias: Bias in each of the two layers of the ``mlp`` projection (OpenCLIP's: none).
    """

    path: str = ""
    from_config: bool = False
    config_overrides: dict[str, Any] = field(default_factory=dict)
    context_length: int = 77
    pool: str = "mean"
    proj: str = "linear"
    proj_bias: bool = False
    mlp_bias: tuple[bool, bool] = (True, True)

    tower: ClassVar[str] = "lipkit.models.text:HFTextEncoder"
    openclip_layout: ClassVar[str] = "hf"  # OpenCLIP: ``text.transformer.*``, ``text.proj.{0,2}``

    def validate(self) -> None:
        if not self.path:
            raise ConfigError("text.path is required for a Hugging Face text tower")
        _check_choice("text.pool", self.pool, ("mean", "cls", "eot"))
        _check_choice("text.proj", self.proj, ("linear", "mlp", "none"))


@dataclass
class ModelConfig:
    """A dual encoder: an image tower, a text tower, a shared embedding width and the loss scalars.

    ``vision`` and ``text`` are mappings with a ``type`` key (``vit``/``timm``, ``transformer``/``hf``);
    the rest is checked against that tower's config class by :meth:`vision_config` / :meth:`text_config`.

    Attributes:
        embed_dim: Width of the shared embedding space.
        vision: Image tower spec.
        text: Text tower spec.
        init_logit_scale: Initial log of the logit scale (CLIP: log(1/0.07); SigLIP: log(10)).
        init_logit_bias: Initial logit bias (SigLIP: -10); ``None`` for no bias parameter.
        max_logit_scale: The scale is clamped at this value (CLIP: 100).
        tokenizer: ``clip`` for CLIP's BPE, or ``hf`` for a Hugging Face tokenizer: the Hugging Face text
            tower's own, or for a text transformer the one at ``tokenizer_path`` (SigLIP, CLIPA...).
        tokenizer_path: Local tokenizer folder (``save_pretrained`` output) or ``tokenizer.json`` file for
            an ``hf`` tokenizer; defaults to a Hugging Face text tower's ``text.path``. Nothing is downloaded.
        tokenizer_source: Where that tokenizer is published (a Hugging Face hub name), named in the message
            when ``tokenizer_path`` is missing.
        tokenizer_clean: Clean-up of texts before an ``hf`` tokenizer: ``whitespace`` (fix text, collapse
            whitespace), ``lower`` (that, lower-cased) or ``canonicalize`` (also drop punctuation), as
            OpenCLIP's tokenizers do.
        tokenizer_strip_sep: Replace the separator token by padding (CLIPA's BERT tokenizer).
        family: The architecture family, for listings (e.g. ``siglip``, ``openai-resnet``).
        custom_text: OpenCLIP holds this model's text tower under ``text.`` (its ``CustomTextCLIP``) rather
            than at the top level; export writes that layout.
        preprocess: Overrides for :class:`lipkit.models.transforms.PreprocessConfig` (mean, std, ...).
        lock_image: Freeze the image tower (LiT); its projection head stays trainable.
        lock_text: Freeze the text tower; its projection head stays trainable.
        unlock_text_layers: With ``lock_text``, keep the top N transformer layers of the text tower
            (and the final norm that follows them, if any) trainable: LiT's partly unlocked text tower.
        decoder: A captioning decoder (:class:`DecoderConfig`): the model is a CoCa
            (:class:`lipkit.models.coca.CoCa`), trained with the ``coca`` loss, that also writes captions.
        class_bridge: The class names of the image tower's own classifier (a set such as
            ``imagenet-1k-both`` or a file, as :func:`lipkit.data.prototypes.read_classnames` reads them):
            each image embedding then adds the text embeddings of those names, weighted by the
            classifier's probabilities (:meth:`DualEncoder.bridge`). Empty: off.
        class_bridge_weight: Initial weight of that term (learned), relative to the image head's output.
        class_bridge_temperature: Temperature of the classifier's softmax over its logits.
        class_bridge_definitions: Also embed each class's WordNet definition with its first name
            (``"a photo of a sweatshirt, cotton knit pullover with long sleeves worn during athletic
            activity."``) into its bridge embedding (ImageNet-1k class name sets only, see
            :func:`lipkit.data.prototypes.read_definitions`).
        class_bridge_hypernyms: Also embed each class's WordNet hypernyms into its bridge embedding:
            ``name`` (``"a photo of a trouser."`` for the class jean) or ``kind`` (``"a photo of a jean, a
            kind of trouser."``); empty: off (ImageNet-1k class name sets only, see
            :func:`lipkit.data.prototypes.read_hypernyms`).
    """

    embed_dim: int = 512
    vision: dict[str, Any] = field(default_factory=lambda: {"type": "vit"})
    text: dict[str, Any] = field(default_factory=lambda: {"type": "transformer"})
    init_logit_scale: float = math.log(1 / 0.07)
    init_logit_bias: float | None = None
    max_logit_scale: float = 100.0
    tokenizer: str = "clip"
    tokenizer_path: str = ""
    tokenizer_source: str = ""
    tokenizer_clean: str = "whitespace"
    tokenizer_strip_sep: bool = False
    family: str = ""
    custom_text: bool = False
    preprocess: dict[str, Any] = field(default_factory=dict)
    lock_image: bool = False
    lock_text: bool = False
    unlock_text_layers: int = 0
    decoder: dict[str, Any] | None = None
    class_bridge: str = ""
    class_bridge_weight: float = 1.0
    class_bridge_temperature: float = 1.0
    class_bridge_definitions: bool = False
    class_bridge_hypernyms: str = ""

    def validate(self) -> None:
        self.vision_config()
        text = self.text_config()
        self.decoder_config()
        if self.unlock_text_layers < 0:
            raise ConfigError(f"unlock_text_layers must be >= 0, got {self.unlock_text_layers}")
        if self.unlock_text_layers and not self.lock_text:
            raise ConfigError("unlock_text_layers only applies to a locked text tower: set lock_text=true")
        layers = getattr(text, "layers", None)
        if layers is not None and self.unlock_text_layers > layers:
            raise ConfigError(f"unlock_text_layers={self.unlock_text_layers} but the text tower has {layers} layers")
        if self.class_bridge and not self.lock_image:
            raise ConfigError(
                "class_bridge reads the frozen image tower's own classifier: set lock_image=true "
                "(a trained trunk moves away from the classifier's feature space)"
            )
        if self.class_bridge and self.decoder is not None:
            raise ConfigError("class_bridge applies to dual encoders, not to a captioning (CoCa) model")
        if self.class_bridge_definitions and not self.class_bridge:
            raise ConfigError("class_bridge_definitions needs a class bridge: set class_bridge (e.g. imagenet-1k-both)")
        if self.class_bridge_hypernyms not in ("", "name", "kind"):
            raise ConfigError(
                f"class_bridge_hypernyms must be name or kind (or empty: off), got {self.class_bridge_hypernyms!r}"
            )
        if self.class_bridge_hypernyms and not self.class_bridge:
            raise ConfigError("class_bridge_hypernyms needs a class bridge: set class_bridge (e.g. imagenet-1k-both)")
        if not self.class_bridge_temperature > 0:
            raise ConfigError(f"class_bridge_temperature must be > 0, got {self.class_bridge_temperature}")
        _check_choice("tokenizer", self.tokenizer, ("clip", "hf"))
        _check_choice("tokenizer_clean", self.tokenizer_clean, ("whitespace", "lower", "canonicalize"))

    def vision_config(self) -> ViTConfig | ResNetConfig | TimmConfig:
        """The typed config of the image tower."""
        return _tower_config("vision", VISION_TOWERS, self.vision)

    def text_config(self) -> TextTransformerConfig | HFTextConfig:
        """The typed config of the text tower."""
        return _tower_config("text", TEXT_TOWERS, self.text)

    def decoder_config(self) -> DecoderConfig | None:
        """The typed config of the captioning decoder, or ``None`` for a dual encoder without one."""
        return None if self.decoder is None else from_dict(DecoderConfig, self.decoder, prefix="decoder.")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"config key {key!r}: expected one of {', '.join(choices)}, got {value!r}")


def _tower_config(kind: str, towers: Registry[type], spec: dict[str, Any]) -> Any:
    spec = dict(spec)
    tower_type = spec.pop("type", None)
    if tower_type not in towers:
        raise ConfigError(f"{kind}.type must be one of {', '.join(towers)}, got {tower_type!r}")
    return from_dict(towers.get(tower_type), spec, prefix=f"{kind}.")


CONFIG_FOLDERS = ("configs", "configs/openclip")
"""Folders of built-in configs inside ``lipkit.models``: lipkit's own, and OpenCLIP's translated by
``tools/openclip_configs.py`` (one file per name in OpenCLIP's list)."""

UNSUPPORTED_KEY = "unsupported"
"""A built-in config holding this key names a family lipkit cannot build yet; its value says why."""


class UnsupportedModelError(ConfigError):
    """A known model name whose architecture lipkit cannot build yet."""


@lru_cache(maxsize=1)
def _builtin_configs() -> dict[str, dict[str, Any]]:
    root = resources.files("lipkit.models")
    out = {}
    for sub in CONFIG_FOLDERS:
        folder = root.joinpath(*sub.split("/"))
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".json"):
                out[entry.name[: -len(".json")]] = json.loads(entry.read_text())
    return out


def list_models(buildable: bool = False) -> list[str]:
    """Names of the built-in model configs.

    Args:
        buildable: Only those lipkit can build now (leave out the families it cannot build yet).
    """
    return sorted(name for name, data in _builtin_configs().items() if not (buildable and UNSUPPORTED_KEY in data))


def model_family(name: str) -> str:
    """The family of a built-in config (``""`` when it names none)."""
    return _builtin_configs()[name].get("family", "")


def unsupported_reason(name: str) -> str | None:
    """Why lipkit cannot build built-in model ``name`` yet, or ``None`` when it can."""
    return _builtin_configs()[name].get(UNSUPPORTED_KEY)


def timm_model_config(timm_name: str) -> dict[str, Any]:
    """A dual encoder around any timm image model: that model (linear head) plus ViT-B-32's text tower."""
    base = _builtin_configs()["ViT-B-32"]
    return {"embed_dim": base["embed_dim"], "vision": {"type": "timm", "name": timm_name}, "text": base["text"]}


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """Resolve a model name (or a path to a JSON file) into a validated :class:`ModelConfig`.

    Args:
        name: A built-in config name (see :func:`list_models`), ``timm/<timm model name>`` (that image
            model with a linear head and ViT-B-32's text tower), or a path ending in ``.json``.
        **overrides: Nested overrides merged into the config, e.g. ``embed_dim=256`` or
            ``vision={"layers": 2}``.

    Raises:
        UnknownNameError: The name is unknown; the message lists the closest names.
        UnsupportedModelError: The name is known (an OpenCLIP model) but its family cannot be built yet.
        ConfigError: The resolved config is invalid.
    """
    if name.startswith("timm/"):
        data = timm_model_config(name[len("timm/") :])
    elif name.endswith(".json"):
        path = Path(name)
        if not path.is_file():
            raise ConfigError(f"model config file not found: {path}")
        data = json.loads(path.read_text())
    else:
        configs = _builtin_configs()
        if name not in configs:
            raise UnknownNameError(f"unknown model {name!r}.{suggest(name, configs)} Run `lipkit models` to list them.")
        data = configs[name]
        if UNSUPPORTED_KEY in data:
            raise UnsupportedModelError(
                f"model {name!r} ({data.get('family', 'unknown family')}) cannot be built yet: {data[UNSUPPORTED_KEY]}"
            )
    return from_dict(ModelConfig, merge(data, overrides))

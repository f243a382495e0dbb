"""The public entry points: create a model, its tokenizer and its image transforms by name."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lipkit.config import from_dict
from lipkit.errors import LipkitError
from lipkit.models.clip import DualEncoder
from lipkit.models.config import HFTextConfig, ModelConfig, get_model_config
from lipkit.models.text_inputs import TextTokens, Tokens, padded_length


def _as_config(model: str | ModelConfig, overrides: dict[str, Any]) -> ModelConfig:
    if isinstance(model, ModelConfig):
        return model
    return get_model_config(model, **overrides)


def create_model(
    name: str | ModelConfig,
    pretrained: str | None = None,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> DualEncoder:
    """Build a dual encoder from a named config, optionally loading weights.

    Args:
        name: A built-in config name (see :func:`lipkit.list_models`), a JSON file, or a ModelConfig.
        pretrained: Path to weights: a lipkit checkpoint, an OpenCLIP state dict or training checkpoint,
            or an OpenAI JIT archive; or one of OpenCLIP's pretrained tags for ``name`` (``"openai"``,
            ``"laion2b_s34b_b79k"``...), resolved to a file already on this machine
            (:func:`lipkit.models.pretrained.resolve_pretrained`), with the preprocessing and
            activation (QuickGELU) those weights were trained with. Nothing is downloaded.
        device: Where to put the model.
        **overrides: Config overrides, e.g. ``embed_dim=256`` or ``vision={"layers": 2}``.

    Returns:
        The model, in eval mode.

    Raises:
        UnknownNameError: Unknown model name (the message lists the closest).
        CheckpointError: The weights do not fit (the message lists missing and unexpected keys).
    """
    if pretrained and isinstance(name, str) and not Path(pretrained).exists():
        from lipkit.models.pretrained import list_pretrained

        tags = [tag for _, tag in list_pretrained(name)]
        if pretrained in tags:
            name, pretrained, overrides = _tagged(name, pretrained, overrides)
        elif tags and "/" not in pretrained and not Path(pretrained).suffix:
            raise LipkitError(
                f"pretrained={pretrained!r} is neither a weights file nor a pretrained tag of {name}; "
                f"its tags: {', '.join(sorted(tags))}"
            )
    cfg = _as_config(name, overrides)
    model = build_model(cfg)
    if pretrained:
        from lipkit.models.convert import load_pretrained

        load_pretrained(model, pretrained)
    if device is not None:
        model.to(device)
    return model.eval()


def build_model(cfg: ModelConfig) -> DualEncoder:
    """The model a config describes, with fresh weights: a :class:`~lipkit.models.coca.CoCa` when it has a
    captioning decoder, else a :class:`DualEncoder`."""
    if cfg.decoder is not None:
        from lipkit.models.coca import CoCa

        return CoCa(cfg)
    return DualEncoder(cfg)


def _tagged(name: str, tag: str, overrides: dict[str, Any]) -> tuple[str, str, dict[str, Any]]:
    """The config name, weights file and overrides for OpenCLIP's pair ``(name, tag)``: the ``-quickgelu``
    twin when the weights were trained with QuickGELU, and their preprocessing unless overridden."""
    from lipkit.models.config import list_models
    from lipkit.models.pretrained import pretrained_info, resolve_pretrained

    info = pretrained_info(name, tag)
    path = str(resolve_pretrained(name, tag))
    if info.get("quick_gelu") and not name.endswith("-quickgelu") and f"{name}-quickgelu" in list_models():
        name = f"{name}-quickgelu"
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in info.items() if k in PREPROCESS_FIELDS}
    preprocess = {**fields, **overrides.get("preprocess", {})}
    return name, path, {**overrides, "preprocess": preprocess} if preprocess else overrides


PREPROCESS_FIELDS = ("mean", "std", "interpolation", "resize_mode")


def get_tokenizer(name: str | ModelConfig, **overrides: Any) -> Callable[..., Tokens]:
    """The tokenizer that matches a model config: call it on a list of strings.

    It returns what the model's text tower takes: token ids (B, T) for a text transformer (from CLIP's
    BPE, or from the local Hugging Face tokenizer at ``tokenizer_path`` for SigLIP and the like), or
    :class:`~lipkit.models.text_inputs.TextTokens` (ids and attention mask) for a Hugging Face text tower.

    Args:
        name: Model name or config.
        **overrides: Config overrides, e.g. ``tokenizer_path="/models/siglip-tokenizer"``.

    Raises:
        LipkitError: The model needs a local tokenizer and ``tokenizer_path`` is not set (the message names
            the tokenizer to fetch), or nothing is at that path.
    """
    cfg = _as_config(name, overrides)
    text_cfg = cfg.text_config()
    if cfg.tokenizer == "hf" and isinstance(text_cfg, HFTextConfig):
        from lipkit.models.hf_tokenizer import HFTokenizer

        return HFTokenizer(cfg.tokenizer_path or text_cfg.path, context_length=text_cfg.context_length)
    if cfg.tokenizer == "hf":
        return _local_hf_tokenizer(cfg, f"model {name!r}" if isinstance(name, str) else "this model")
    from lipkit.models.tokenizer import ClipTokenizer

    return ClipTokenizer(context_length=text_cfg.context_length)


def check_tokenizer(name: str | ModelConfig, **overrides: Any) -> None:
    """Raise now, before any work, if the model's tokenizer would be missing (see :func:`get_tokenizer`)."""
    cfg = _as_config(name, overrides)
    if cfg.tokenizer == "hf" and not isinstance(cfg.text_config(), HFTextConfig):
        _require_tokenizer_path(cfg, f"model {name!r}" if isinstance(name, str) else "this model")


def _require_tokenizer_path(cfg: ModelConfig, label: str) -> None:
    if not cfg.tokenizer_path:
        source = f" {cfg.tokenizer_source!r}" if cfg.tokenizer_source else ""
        raise LipkitError(
            f"{label} needs its Hugging Face tokenizer{source} from a local file or folder and none is set: "
            f"pass tokenizer_path=PATH (a tokenizer.json file or a save_pretrained folder) to get_tokenizer, "
            f"or set tokenizer_path in the model config (in training: model_overrides.tokenizer_path=PATH)"
        )


def _local_hf_tokenizer(cfg: ModelConfig, label: str) -> Callable[..., Tokens]:
    """The Hugging Face tokenizer at ``cfg.tokenizer_path`` for a text transformer (token ids out)."""
    from lipkit.models.hf_tokenizer import HFIdsTokenizer

    _require_tokenizer_path(cfg, label)
    text_cfg = cfg.text_config()
    return HFIdsTokenizer(
        cfg.tokenizer_path,
        context_length=text_cfg.context_length,
        clean=cfg.tokenizer_clean,
        strip_sep=cfg.tokenizer_strip_sep,
        pad_id=getattr(text_cfg, "pad_id", 0),
    )


class TrimPadding:
    """A tokenizer whose batches drop the trailing positions that are padding in every row.

    Texts are padded to the context length (77 for CLIP), yet most captions are far shorter: a batch
    only needs as many positions as its longest text, rounded up to ``multiple`` (fewer distinct shapes
    for compiled graphs and tensor cores). Exact only for towers whose features ignore trailing
    padding (see :func:`padding_trim_is_exact`). Runs where the tokenizer runs (in the loader's
    workers), so the training step needs no look at the tokens.
    """

    def __init__(self, tokenize: Callable[..., Tokens], pad_id: int, multiple: int = 8) -> None:
        self.tokenize, self.pad_id, self.multiple = tokenize, pad_id, multiple

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> Tokens:
        tokens = self.tokenize(texts, *args, **kwargs)
        if isinstance(tokens, TextTokens):  # the attention mask says which positions are used
            return tokens.trim(self.multiple)
        keep = padded_length(tokens != self.pad_id, self.multiple)
        return tokens[:, :keep].contiguous()


def padding_trim_is_exact(name: str | ModelConfig) -> bool:
    """Whether dropping positions that are padding in every row leaves every text feature as it is.

    True for Hugging Face towers (their attention mask hides padding) and for causal CLIP text towers
    not pooled at the last position (no token attends to a later one); false for bidirectional CLIP
    towers, whose tokens attend to the padding.
    """
    cfg = _as_config(name, {})
    text = cfg.text_config()
    if isinstance(text, HFTextConfig):
        return True
    return bool(getattr(text, "causal", False)) and text.pool != "last"


def batch_tokenizer(name: str | ModelConfig) -> Callable[..., Tokens]:
    """:func:`get_tokenizer`, trimming each batch's shared padding where that is exact.

    What the training loader, the zero-shot classifier and pair embedding tokenize with; call
    :func:`get_tokenizer` for fixed-length ids (exporting, comparing with other libraries).
    """
    cfg = _as_config(name, {})
    tokenize = get_tokenizer(cfg)
    if not padding_trim_is_exact(cfg):
        return tokenize
    return TrimPadding(tokenize, getattr(cfg.text_config(), "pad_id", 0))


def preprocess_config(cfg: ModelConfig) -> Any:
    """The :class:`PreprocessConfig` for a model: its image size plus the config's overrides."""
    from lipkit.models.transforms import PreprocessConfig

    data = {"image_size": cfg.vision_config().image_size, **cfg.preprocess}
    return from_dict(PreprocessConfig, data, prefix="preprocess.")


def image_transform(
    name: str | ModelConfig, train: bool = False, **overrides: Any
) -> Callable[[Image.Image], torch.Tensor]:
    """The image transform for a model: PIL image -> normalised (3, H, W) tensor.

    Args:
        name: Model name or config.
        train: Random resized crop for training instead of the deterministic evaluation transform.
        **overrides: Model config overrides.
    """
    from lipkit.models.transforms import image_transform as build

    return build(preprocess_config(_as_config(name, overrides)), train=train)

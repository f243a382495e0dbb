"""The public entry points: create a model, its tokenizer and its image transforms by name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image

from lipkit.config import from_dict
from lipkit.models.clip import DualEncoder
from lipkit.models.config import ModelConfig, get_model_config


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
            or an OpenAI JIT archive. Nothing is downloaded.
        device: Where to put the model.
        **overrides: Config overrides, e.g. ``embed_dim=256`` or ``vision={"layers": 2}``.

    Returns:
        The model, in eval mode.

    Raises:
        UnknownNameError: Unknown model name (the message lists the closest).
        CheckpointError: The weights do not fit (the message lists missing and unexpected keys).
    """
    cfg = _as_config(name, overrides)
    model = DualEncoder(cfg)
    if pretrained:
        from lipkit.models.convert import load_pretrained

        load_pretrained(model, pretrained)
    if device is not None:
        model.to(device)
    return model.eval()


def get_tokenizer(name: str | ModelConfig, **overrides: Any) -> Callable[..., torch.Tensor]:
    """The tokenizer that matches a model config: call it on a list of strings to get (B, T) ids."""
    cfg = _as_config(name, overrides)
    text_cfg = cfg.text_config()
    if cfg.tokenizer == "hf":
        from lipkit.models.hf_tokenizer import HFTokenizer

        return HFTokenizer(text_cfg.path, context_length=text_cfg.context_length)
    from lipkit.models.tokenizer import ClipTokenizer

    return ClipTokenizer(context_length=text_cfg.context_length)


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

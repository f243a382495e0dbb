"""Model zoo: config-driven dual encoders, towers, tokenizers, transforms and checkpoint converters."""

from lipkit.models.clip import DualEncoder, DualEncoderOutput
from lipkit.models.config import ModelConfig, get_model_config, list_models
from lipkit.models.factory import create_model, get_tokenizer, image_transform

__all__ = [
    "DualEncoder",
    "DualEncoderOutput",
    "ModelConfig",
    "create_model",
    "get_model_config",
    "get_tokenizer",
    "image_transform",
    "list_models",
]

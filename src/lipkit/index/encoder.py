"""The model behind an embeddings folder or an index: its fingerprint, its record, and a query encoder.

A :class:`~lipkit.data.embeddings.ModelRecord` travels with every embeddings folder and index, so that a
query is only ever compared with vectors of the same model, and so that ``lipkit serve`` can reload that model.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lipkit.data.embeddings import ModelRecord
from lipkit.errors import ConfigError, LipkitError
from lipkit.models.fingerprint import model_fingerprint

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from lipkit.models import DualEncoder, ModelConfig

# model -> (the versions of its tensors when hashed, the fingerprint)


TEXT_RUNTIMES = ("auto", "torch", "onnx")


def check_runtime(name: str) -> str:
    """``name`` if it is a text runtime lipkit knows.

    Raises:
        ConfigError: Any other name.
    """
    if name not in TEXT_RUNTIMES:
        raise ConfigError(f"text runtime {name!r}: use one of {', '.join(TEXT_RUNTIMES)}")
    return name


class ImageInputError(LipkitError):
    """An image given to the encoder could not be turned into the model's input."""


class ModelChangedError(LipkitError):
    """The weights a record points to are no longer the weights the record was made with."""


class QueryEncoder:
    """Turns texts and images into L2-normalised float32 embeddings with one model.

    Uses the model's own tokenizer and image transform. Calls are serialised by a lock, so the encoder
    may be shared between threads, one call running at a time.

    Args:
        model: The dual encoder (put in eval mode on ``device``).
        device: Where to run it: ``auto``, ``cpu``, ``cuda``... or a torch device.
        checkpoint: The file its weights came from, recorded in :attr:`record`.
        config: The config name to record (default: the config itself, as a dict).
        text_runtime: What runs the text tower: ``torch``; ``onnx``, ONNX Runtime on CPU, about twice as fast
            for short queries (:mod:`lipkit.index.onnx_text`); or ``auto``, ONNX Runtime where it is installed,
            the model is on CPU and its export matches PyTorch, else PyTorch.

    Raises:
        ConfigError: An unknown ``text_runtime``, or ``onnx`` for a model that is not on CPU.
        OnnxTextError: ``onnx`` and the text tower cannot run on ONNX Runtime (the message says why).
    """

    def __init__(
        self,
        model: DualEncoder,
        device: str | torch.device = "cpu",
        checkpoint: str | Path | None = None,
        config: str | None = None,
        text_runtime: str = "torch",
    ) -> None:
        from lipkit.config import to_dict
        from lipkit.models import image_transform
        from lipkit.models.factory import batch_tokenizer
        from lipkit.utils import resolve_device

        self.device = resolve_device(device) if isinstance(device, str) else device
        self.model = model.eval().to(self.device)
        self._tokenize = batch_tokenizer(model.cfg)
        self._transform = image_transform(model.cfg)
        self._lock = threading.Lock()
        weights = str(Path(checkpoint).resolve()) if checkpoint is not None else None
        self._config = config if config is not None else to_dict(model.cfg)
        self._checkpoint = weights
        self._onnx_text = self._text_runner(check_runtime(text_runtime))

    def use_text_runtime(self, text_runtime: str) -> None:
        """Switch what runs the text tower (``torch``, ``onnx`` or ``auto``, as the constructor's argument).

        Raises:
            ConfigError: An unknown runtime, or ``onnx`` for a model that is not on CPU.
            OnnxTextError: ``onnx`` and the text tower cannot run on ONNX Runtime.
        """
        self._onnx_text = self._text_runner(check_runtime(text_runtime))

    def _text_runner(self, runtime: str) -> Any:
        if runtime == "torch" or (runtime == "auto" and self.device.type != "cpu"):
            return None
        if self.device.type != "cpu":
            raise ConfigError(f"text runtime onnx runs on CPU; the model is on {self.device}: use torch or auto")
        from lipkit.index.onnx_text import onnx_text_runner

        return onnx_text_runner(self.model, self._tokenize, model_fingerprint(self.model), required=runtime == "onnx")

    @property
    def text_runtime(self) -> str:
        """What encodes text queries: ``onnx`` or ``torch``."""
        return "torch" if self._onnx_text is None else "onnx"

    @property
    def record(self) -> ModelRecord:
        """The model's record (its fingerprint reflects the weights as they are now)."""
        fingerprint = model_fingerprint(self.model)
        return ModelRecord(fingerprint, int(self.model.cfg.embed_dim), self._config, self._checkpoint)

    @property
    def embed_dim(self) -> int:
        """Width of the embeddings."""
        return int(self.model.cfg.embed_dim)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """Embed texts (too long ones are truncated by the tokenizer): (N, D) float32, unit rows."""
        if not texts:
            return np.zeros((0, self.embed_dim), np.float32)
        with self._lock:
            tokens = self._tokenize(list(texts))
            if self._onnx_text is not None:
                return self._onnx_text(tokens)
            return self._run(lambda: self.model.encode_text(tokens.to(self.device), normalize=True))

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Embed PIL images: (N, D) float32, unit rows.

        Raises:
            ImageInputError: An image cannot be converted into the model's input.
        """
        import torch

        if not images:
            return np.zeros((0, self.embed_dim), np.float32)
        with self._lock:
            batch = torch.stack([self._image_tensor(image, i) for i, image in enumerate(images)])
            return self._run(lambda: self.model.encode_image(batch.to(self.device), normalize=True))

    def _image_tensor(self, image: Image.Image, position: int) -> torch.Tensor:
        try:
            return self._transform(image)
        except Exception as exc:  # PIL raises many kinds for a broken picture
            raise ImageInputError(f"image {position} cannot be read as a picture: {exc}") from None

    def _run(self, forward: Any) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return forward().float().cpu().numpy()


def load_encoder(
    checkpoint: str | Path,
    model: str | dict[str, Any] | ModelConfig | None = None,
    device: str | torch.device = "auto",
    text_runtime: str = "torch",
) -> QueryEncoder:
    """Load a model as ``lipkit eval`` does and wrap it in a :class:`QueryEncoder`.

    Args:
        checkpoint: A run directory (its newest checkpoint), a lipkit checkpoint, or OpenCLIP/OpenAI weights.
        model: The model config: a name, a dict, or a ModelConfig (default: the one the checkpoint records).
        device: Where to run the model.
        text_runtime: What runs the text tower (see :class:`QueryEncoder`).

    Raises:
        CheckpointError: No checkpoint there, or its weights do not fit the model.
        UnknownNameError: Unknown model name.
    """
    from lipkit.train.checkpoint import load_trained

    net, weights = load_trained(checkpoint, model)
    config = model if isinstance(model, str) else None
    return QueryEncoder(net, device, checkpoint=weights, config=config, text_runtime=text_runtime)


def encoder_for_record(
    record: ModelRecord, device: str | torch.device = "auto", text_runtime: str = "torch"
) -> QueryEncoder:
    """Reload the model a record names, checking that its weights are still those that made the record.

    ``text_runtime`` is what runs the text tower (see :class:`QueryEncoder`).

    Raises:
        ModelChangedError: The record names no checkpoint, or the weights there changed.
        CheckpointError: The checkpoint is gone or unreadable.
    """
    if record.checkpoint is None:
        raise ModelChangedError(f"model {record.fingerprint[:12]} was never saved: its record names no checkpoint")
    check_runtime(text_runtime)
    encoder = load_encoder(record.checkpoint, record.config, device)  # checked before any export to ONNX
    found = encoder.record.fingerprint
    if found != record.fingerprint:
        raise ModelChangedError(
            f"the weights in {record.checkpoint} changed: fingerprint {found[:12]}, expected {record.fingerprint[:12]}"
        )
    encoder.use_text_runtime(text_runtime)
    return encoder

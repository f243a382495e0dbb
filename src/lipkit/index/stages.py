"""The two stages of an embedding job, each a pure function of a batch of rows.

A batch is a dict of NumPy columns of equal length, the format of Ray Data's ``map_batches``, so the
same callables run in a local loop (decoding in DataLoader workers) and on a Ray cluster:

* :class:`Decoder` turns rows holding an item ``index`` into model inputs: ``pixels`` (N, 3, H, W),
  fixed-length token ``ids`` (and ``mask`` for Hugging Face towers), plus ``caption``, ``thumbnail``,
  ``width``, ``height``, and ``ok``/``reason`` for items that could not be decoded (counted, not raised).
* :class:`Embedder` holds the model and turns those inputs into L2-normalised float32 ``image`` and
  ``text`` columns (N, D), trimming the tokens' shared padding where that leaves the features exact.

Columns the stages do not know (``part``) pass through.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lipkit.data.pairs import PairSource, prefetch

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from lipkit.models import DualEncoder, ModelConfig

THUMBNAIL_SIDE = 160
THUMBNAIL_QUALITY = 85
MODALITIES = ("image", "text")
_INPUTS = ("pixels", "ids", "mask")


def thumbnail_jpeg(image: Image.Image, side: int = THUMBNAIL_SIDE) -> bytes:
    """A JPEG of ``image`` (transparency flattened onto white) whose longest side is at most ``side``."""
    from lipkit.data.decode import flatten, resize_max_side

    buf = io.BytesIO()
    resize_max_side(flatten(image), side).save(buf, "JPEG", quality=THUMBNAIL_QUALITY)
    return buf.getvalue()


class Decoder:
    """Batch of item indexes -> decoded, transformed and tokenised inputs (see the module docstring).

    Args:
        source: The pairs the indexes point into.
        cfg: The model config (its image transform and tokenizer are used).
        modalities: Which inputs to make (``image``: pixels, ``text``: tokens).
        thumbnails: Also make a JPEG thumbnail of each image.
    """

    def __init__(self, source: PairSource, cfg: ModelConfig, modalities: Sequence[str], thumbnails: bool) -> None:
        from lipkit.models import get_tokenizer, image_transform
        from lipkit.models.factory import preprocess_config

        self.source, self.modalities, self.thumbnails = source, tuple(modalities), thumbnails
        self.transform = image_transform(cfg)
        self.tokenize = get_tokenizer(cfg)
        size = preprocess_config(cfg).image_size
        self.image_shape = (3, size, size)

    @property
    def needs_image(self) -> bool:
        return "image" in self.modalities or self.thumbnails

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        indexes = [int(i) for i in batch["index"]]
        prefetch(self.source, indexes)
        rows = [self._decode(i) for i in indexes]
        out = {name: values for name, values in batch.items() if name not in _INPUTS}
        out["ok"] = np.array([r["reason"] == "" for r in rows], bool)
        for name in ("reason", "caption", "thumbnail"):
            out[name] = _objects([r[name] for r in rows])
        out["width"] = np.array([r["size"][0] for r in rows], np.int64)
        out["height"] = np.array([r["size"][1] for r in rows], np.int64)
        if "image" in self.modalities:
            out["pixels"] = np.stack([r["pixels"] for r in rows]).astype(np.float32, copy=False)
        if "text" in self.modalities:
            out.update(self._tokens([r["caption"] for r in rows]))
        return out

    def _decode(self, index: int) -> dict[str, Any]:
        row: dict[str, Any] = {"reason": "", "caption": "", "thumbnail": None, "size": (0, 0)}
        row["pixels"] = np.zeros(self.image_shape, np.float32)
        try:
            row["caption"] = self.source.caption(index)
            if self.needs_image:
                image = self.source.image(index)
                row["size"] = image.size
                if "image" in self.modalities:
                    row["pixels"] = self.transform(image).numpy()
                if self.thumbnails:
                    row["thumbnail"] = thumbnail_jpeg(image)
        except Exception as exc:  # any broken sample is counted by its reason and left out
            row["reason"] = getattr(exc, "reason", "undecodable_image")
        return row

    def _tokens(self, captions: list[str]) -> dict[str, np.ndarray]:
        from lipkit.models import TextTokens

        tokens = self.tokenize(captions)
        if isinstance(tokens, TextTokens):
            return {"ids": tokens.ids.numpy(), "mask": tokens.mask.numpy()}
        return {"ids": tokens.numpy()}


def _objects(values: list[Any]) -> np.ndarray:
    """A 1-D object array (``np.array`` would try to make bytes and strings into fixed-width arrays)."""
    out = np.empty(len(values), object)
    out[:] = values
    return out


class Embedder:
    """Decoded inputs -> ``image`` and ``text`` embeddings: the stage that holds the model.

    Args:
        model: The dual encoder (put in eval mode on ``device``).
        device: Where to run it.
        modalities: Which embeddings to make.
    """

    def __init__(self, model: DualEncoder, device: str | torch.device, modalities: Sequence[str]) -> None:
        from lipkit.models.factory import padding_trim_is_exact

        self.device, self.modalities = device, tuple(modalities)
        self.model = model.eval().to(device)
        self.trim = padding_trim_is_exact(model.cfg)
        self.pad_id = getattr(model.cfg.text_config(), "pad_id", 0)

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """Embed a decoded batch (its ``pixels``, ``ids`` and ``mask`` may also be torch tensors)."""
        import torch

        out = {name: values for name, values in batch.items() if name not in _INPUTS}
        with torch.inference_mode():
            if "image" in self.modalities:
                pixels = torch.as_tensor(batch["pixels"]).to(self.device, non_blocking=True)
                out["image"] = self._numpy(self.model.encode_image(pixels, normalize=True))
            if "text" in self.modalities:
                out["text"] = self._numpy(self.model.encode_text(self._tokens(batch), normalize=True))
        return out

    def _tokens(self, batch: dict[str, np.ndarray]) -> Any:
        import torch

        from lipkit.models import TextTokens
        from lipkit.models.text_inputs import padded_length

        ids = torch.as_tensor(batch["ids"])
        if "mask" in batch:
            tokens = TextTokens(ids, torch.as_tensor(batch["mask"]))
            return (tokens.trim(8) if self.trim else tokens).to(self.device, non_blocking=True)
        if self.trim:
            ids = ids[:, : padded_length(ids != self.pad_id, 8)]
        return ids.to(self.device, non_blocking=True)

    @staticmethod
    def _numpy(x: torch.Tensor) -> np.ndarray:
        return x.float().cpu().numpy()

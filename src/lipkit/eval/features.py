"""Frozen features for evaluation: image embeddings of labelled sets, text classifiers from prompts."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from lipkit.errors import LipkitError
from lipkit.eval.embed import embed_dataset, image_column, keep_column
from lipkit.models import DualEncoder, image_transform
from lipkit.models.factory import batch_tokenizer


class LabelledImages(Protocol):
    """What evaluation needs from a labelled image set."""

    classnames: list[str]

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image: ...

    def label(self, index: int) -> int: ...


class _Transformed(Dataset):
    def __init__(self, data: LabelledImages, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.data.image(index)), self.data.label(index)


def image_features(
    model: DualEncoder,
    data: LabelledImages,
    batch_size: int = 256,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-normalised image embeddings (N, D) in float32 on CPU, and the labels (N,)."""
    dataset = _Transformed(data, image_transform(model.cfg))
    columns = (image_column(model, device), keep_column)
    feats, labels = embed_dataset(model, dataset, columns, batch_size, workers, device, progress, "image features")
    return feats, labels


def check_prompts(classnames: Sequence[str], templates: Sequence[str]) -> None:
    """Raise a clear error for class names and templates that cannot make prompts."""
    if not classnames:
        raise LipkitError("the list of class names is empty")
    if not templates:
        raise LipkitError("the list of prompt templates is empty")
    for template in templates:
        if "{c}" not in template:
            raise LipkitError(f"prompt template {template!r} has no '{{c}}' placeholder for the class name")


@torch.no_grad()
def text_classifier(
    model: DualEncoder,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    batch_size: int = 256,
) -> torch.Tensor:
    """Zero-shot class embeddings (C, D): per class, the normalised mean of its normalised prompt embeddings.

    Args:
        model: The dual encoder.
        classnames: One name per class.
        templates: Prompt templates with a ``{c}`` placeholder, e.g. ``"a photo of a {c}."``.
        device: Where to run the text tower.
        batch_size: Prompts per forward pass.
    """
    check_prompts(classnames, templates)
    tokenizer = batch_tokenizer(model.cfg)
    model.eval().to(device)
    prompts = [t.replace("{c}", name) for name in classnames for t in templates]
    chunks = [
        model.encode_text(tokenizer(prompts[i : i + batch_size]).to(device), normalize=True).float().cpu()
        for i in range(0, len(prompts), batch_size)
    ]
    per_prompt = torch.cat(chunks).view(len(classnames), len(templates), -1)  # (C, T, D)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)

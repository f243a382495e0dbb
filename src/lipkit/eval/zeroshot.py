"""Zero-shot classification: class embeddings from prompts (cached on disk) and classification metrics."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lipkit.cache import cached
from lipkit.errors import LipkitError
from lipkit.eval.features import LabelledImages, check_prompts, image_features, text_classifier
from lipkit.models import DualEncoder
from lipkit.utils import cache_root, update_digest


def classification_metrics(
    scores: torch.Tensor, labels: torch.Tensor, num_classes: int, ks: Sequence[int] = (1, 5)
) -> dict[str, Any]:
    """Accuracy, recall per class and the confusion matrix of class scores.

    Args:
        scores: Class scores or logits (N, C); the prediction is the arg-max of each row.
        labels: True class indices (N,).
        num_classes: C.
        ks: The k of top-k accuracy; each is capped at C, and the key names the k used (``top5`` with
            10 classes, ``top3`` with 3).

    Returns:
        ``top{k}`` and ``mean_per_class_recall`` in percent (the mean over classes that have samples),
        ``n``, ``per_class_recall`` (percent, ``None`` for a class without samples) and
        ``confusion_matrix`` (C x C lists of counts; row = true class, column = predicted class).
    """
    if scores.ndim != 2 or scores.shape[1] != num_classes or scores.shape[0] != labels.shape[0]:
        raise LipkitError(f"scores {tuple(scores.shape)} do not fit {labels.shape[0]} labels and {num_classes} classes")
    if scores.shape[0] == 0:
        raise LipkitError("no samples to score")
    labels = labels.long().cpu()
    if labels.min() < 0 or labels.max() >= num_classes:
        raise LipkitError(
            f"labels range over {int(labels.min())}..{int(labels.max())} but there are {num_classes} classes"
        )
    scores = scores.float().cpu()
    predicted = scores.argmax(dim=1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, -1)
    support = confusion.sum(dim=1)
    recall = 100.0 * confusion.diag().double() / support.clamp(min=1)
    out: dict[str, Any] = {}
    for k in sorted({min(k, num_classes) for k in ks}):
        hits = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1)
        out[f"top{k}"] = 100.0 * float(hits.double().mean())
    out["mean_per_class_recall"] = float(recall[support > 0].mean())
    out["n"] = int(labels.shape[0])
    out["per_class_recall"] = [float(r) if s > 0 else None for r, s in zip(recall.tolist(), support.tolist())]
    out["confusion_matrix"] = confusion.tolist()
    return out


def model_fingerprint(model: DualEncoder) -> str:
    """A hash of what class embeddings depend on: the model config and the text tower's tensors."""
    h = hashlib.sha256(json.dumps(dataclasses.asdict(model.cfg), sort_keys=True, default=str).encode())
    update_digest(h, model.text)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$LIPKIT_CACHE_DIR/classifiers``, by default ``~/.cache/lipkit/classifiers``."""
    return cache_root() / "classifiers"


def classifier_key(fingerprint: str, classnames: Sequence[str], templates: Sequence[str]) -> str:
    """The cache key of a class-embedding matrix: model, class names and templates, in order."""
    payload = json.dumps({"model": fingerprint, "classnames": list(classnames), "templates": list(templates)})
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:32]


def cached_text_classifier(
    model: DualEncoder,
    classnames: Sequence[str],
    templates: Sequence[str],
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,
) -> tuple[torch.Tensor, bool]:
    """:func:`~lipkit.eval.features.text_classifier`, read from or written to an on-disk cache.

    Args:
        model: The dual encoder.
        classnames: One name per class.
        templates: Prompt templates with ``{c}``.
        device: Where to run the text tower on a cache miss.
        cache_dir: The cache folder (default :func:`default_cache_dir`); files are written atomically.

    Returns:
        The class embeddings (C, D) on CPU and whether they came from the cache.
    """
    check_prompts(classnames, templates)
    path = (
        Path(cache_dir or default_cache_dir()) / f"{classifier_key(model_fingerprint(model), classnames, templates)}.pt"
    )
    names, prompts = list(classnames), list(templates)
    hit = True

    def compute() -> dict[str, Any]:
        nonlocal hit
        hit = False
        classifier = text_classifier(model, classnames, templates, device=device)
        return {"classifier": classifier, "classnames": names, "templates": prompts}

    def sound(entry: dict) -> bool:  # the key hashes these too; a collision or a moved file is rejected
        return entry.get("classnames") == names and entry.get("templates") == prompts

    entry = cached(path, compute, sound)  # a cache that cannot be written only costs a warning
    return entry["classifier"], hit


def zeroshot_classify(
    model: DualEncoder,
    data: LabelledImages,
    classnames: Sequence[str],
    templates: Sequence[str],
    batch_size: int = 256,
    workers: int = 0,
    device: torch.device | str = "cpu",
    cache: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Classify every image of ``data`` by its most similar class prompt embedding.

    Args:
        model: The dual encoder.
        data: The labelled images; label ``i`` is ``classnames[i]``.
        classnames: The names put into the templates, one per class of ``data``.
        templates: Prompt templates with ``{c}``; a class embedding is the mean over its prompts.
        batch_size: Images per forward pass.
        workers: Image loading processes.
        device: Where to run the model.
        cache: Read and write class embeddings in ``cache_dir`` (see :func:`cached_text_classifier`).
        cache_dir: The cache folder (default :func:`default_cache_dir`).
        progress: Show a progress bar.

    Returns:
        :func:`classification_metrics`, plus ``classifier_cached``: whether the class embeddings came
        from the cache.
    """
    if len(classnames) != len(data.classnames):
        raise LipkitError(f"{len(classnames)} class names given for a dataset of {len(data.classnames)} classes")
    if cache:
        classifier, hit = cached_text_classifier(model, classnames, templates, device, cache_dir)
    else:
        classifier, hit = text_classifier(model, classnames, templates, device=device), False
    features, labels = image_features(model, data, batch_size, workers, device, progress)
    scores = features @ classifier.T  # (N, C) cosine similarities
    return {**classification_metrics(scores, labels, len(classnames)), "classifier_cached": hit}

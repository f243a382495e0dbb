"""Zero-shot classification: class embeddings from prompts (cached on disk), scored with classification metrics."""

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
from lipkit.eval.metrics import classification_metrics
from lipkit.models import DualEncoder
from lipkit.utils import cache_root, update_digest


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
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
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
        features: The image features and labels of ``data`` as :func:`~lipkit.eval.features.image_features`
            returns them, when already computed (e.g. read from a cache); computed here when None.

    Returns:
        :func:`~lipkit.eval.metrics.classification_metrics`, plus ``classifier_cached``: whether the class
        embeddings came from the cache.
    """
    if len(classnames) != len(data.classnames):
        raise LipkitError(f"{len(classnames)} class names given for a dataset of {len(data.classnames)} classes")
    if cache:
        classifier, hit = cached_text_classifier(model, classnames, templates, device, cache_dir)
    else:
        classifier, hit = text_classifier(model, classnames, templates, device=device), False
    if features is None:
        features = image_features(model, data, batch_size, workers, device, progress)
    image_feats, labels = features
    scores = image_feats @ classifier.T  # (N, C) cosine similarities
    return {**classification_metrics(scores, labels, len(classnames)), "classifier_cached": hit}

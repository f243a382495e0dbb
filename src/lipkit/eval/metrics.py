"""Classification metrics of class scores: top-k accuracy, recall per class and the confusion matrix.

Every metric is computed from :class:`ClassificationCounts`. Counts of disjoint sets of samples add up, so
processes that each score a share of a set sum their counts and get the metrics of the whole set.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lipkit.errors import LipkitError

DEFAULT_KS = (1, 5)


@dataclass
class ClassificationCounts:
    """The counts that classification metrics are computed from.

    Attributes:
        confusion: (C, C) int64 counts; row = true class, column = predicted class (the arg-max score).
        topk_hits: (K,) int64: for each k of ``ks``, the samples whose true class is among their k best scores.
        ks: The k of top-k accuracy, sorted, each capped at C.
    """

    confusion: torch.Tensor
    topk_hits: torch.Tensor
    ks: tuple[int, ...]

    @classmethod
    def zeros(cls, num_classes: int, ks: Sequence[int] = DEFAULT_KS) -> ClassificationCounts:
        """The counts of no samples."""
        ks = capped_ks(ks, num_classes)
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
        return cls(confusion, torch.zeros(len(ks), dtype=torch.long), ks)

    def apply(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ClassificationCounts:
        """The counts with ``fn`` applied to each tensor, e.g. a sum over processes."""
        return ClassificationCounts(fn(self.confusion), fn(self.topk_hits), self.ks)


def capped_ks(ks: Sequence[int], num_classes: int) -> tuple[int, ...]:
    """The distinct k of top-k accuracy, sorted and each capped at the number of classes."""
    if not ks or min(ks) < 1:
        raise LipkitError(f"top-k accuracy needs k >= 1, got {list(ks)}")
    return tuple(sorted({min(k, num_classes) for k in ks}))


def count_predictions(
    scores: torch.Tensor, labels: torch.Tensor, num_classes: int, ks: Sequence[int] = DEFAULT_KS
) -> ClassificationCounts:
    """Count the predictions of class scores against the true labels.

    Args:
        scores: Class scores or logits (N, C); the prediction is the arg-max of each row. N may be 0.
        labels: True class indices (N,).
        num_classes: C.
        ks: The k of top-k accuracy; each is capped at C.
    """
    if scores.ndim != 2 or scores.shape[1] != num_classes or scores.shape[0] != labels.shape[0]:
        raise LipkitError(f"scores {tuple(scores.shape)} do not fit {labels.shape[0]} labels and {num_classes} classes")
    ks = capped_ks(ks, num_classes)
    labels = labels.long().cpu()
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise LipkitError(
            f"labels range over {int(labels.min())}..{int(labels.max())} but there are {num_classes} classes"
        )
    scores = scores.float().cpu()
    predicted = scores.argmax(dim=1)
    confusion = torch.bincount(labels * num_classes + predicted, minlength=num_classes**2).view(num_classes, -1)
    hits = [(scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum() for k in ks]
    return ClassificationCounts(confusion, torch.stack(hits).long(), ks)


def metrics_from_counts(counts: ClassificationCounts) -> dict[str, Any]:
    """Accuracy, recall per class and the confusion matrix.

    Returns:
        ``top{k}`` for each k of ``counts.ks`` and ``mean_per_class_recall`` in percent (the mean over classes
        that have samples), ``n``, ``per_class_recall`` (percent, ``None`` for a class without samples) and
        ``confusion_matrix`` (C x C lists of counts; row = true class, column = predicted class).
    """
    confusion = counts.confusion
    n = int(confusion.sum())
    if n == 0:
        raise LipkitError("no samples to score")
    support = confusion.sum(dim=1)
    recall = 100.0 * confusion.diag().double() / support.clamp(min=1)
    out: dict[str, Any] = {f"top{k}": 100.0 * (hits / n) for k, hits in zip(counts.ks, counts.topk_hits.tolist())}
    out["mean_per_class_recall"] = float(recall[support > 0].mean())
    out["n"] = n
    out["per_class_recall"] = [float(r) if s > 0 else None for r, s in zip(recall.tolist(), support.tolist())]
    out["confusion_matrix"] = confusion.tolist()
    return out


def classification_metrics(
    scores: torch.Tensor, labels: torch.Tensor, num_classes: int, ks: Sequence[int] = DEFAULT_KS
) -> dict[str, Any]:
    """Accuracy, recall per class and the confusion matrix of class scores.

    Args:
        scores: Class scores or logits (N, C); the prediction is the arg-max of each row.
        labels: True class indices (N,).
        num_classes: C.
        ks: The k of top-k accuracy; each is capped at C, and the key names the k used (``top5`` with
            10 classes, ``top3`` with 3).

    Returns:
        :func:`metrics_from_counts` of the scores.
    """
    return metrics_from_counts(count_predictions(scores, labels, num_classes, ks))

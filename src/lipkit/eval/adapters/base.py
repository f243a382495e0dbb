"""What every few-shot adapter shares: its result type, the registry, zero-shot logits and validation folds.

Hyper-parameters are chosen only on folds cut from the K-shot training set (:func:`cv_folds`): an adapter is
handed the K-shot features and labels, the zero-shot class embeddings and the folds, and never sees a test
example.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lipkit.errors import LipkitError
from lipkit.eval.metrics import count_predictions, metrics_from_counts
from lipkit.registry import Registry

ZEROSHOT_SCALE = 100.0  # CLIP's zero-shot logits: 100 * cosine similarity

Fold = tuple[torch.Tensor, torch.Tensor]  # (train indices, validation indices) into the K-shot set
# (train features, train labels, validation features) -> one validation logits tensor (N_val, C) per candidate
Scorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Iterator[torch.Tensor]]


@dataclass
class Adapted:
    """A classifier fitted on K-shot features.

    Attributes:
        predict: Maps L2-normalised image features (N, D) to class logits (N, C).
        params: The hyper-parameters it uses, chosen on validation folds (or defaults when there are none).
    """

    predict: Callable[[torch.Tensor], torch.Tensor]
    params: dict[str, float] = field(default_factory=dict)


# name -> fit(feats, labels, zeroshot_weights, folds, *, seed, **options) -> Adapted
ADAPTERS: Registry[Callable[..., Adapted]] = Registry("few-shot method")


def zeroshot_logits(feats: torch.Tensor, zeroshot_weights: torch.Tensor) -> torch.Tensor:
    """CLIP's zero-shot logits ``100 * f @ W.T`` for features (N, D) and class embeddings (C, D)."""
    return ZEROSHOT_SCALE * feats @ zeroshot_weights.T


def one_hot(labels: torch.Tensor, n_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One-hot rows (N, C) for integer labels (N,)."""
    return torch.nn.functional.one_hot(labels, n_classes).to(dtype)


def shot_positions(labels: torch.Tensor) -> torch.Tensor:
    """Each example's position among the examples of its class, in the order given (N,)."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels)
    starts = torch.cumsum(counts, 0) - counts  # (C,) first sorted index of each class
    positions = torch.empty_like(labels)
    positions[order] = torch.arange(len(labels), device=labels.device) - starts[labels[order]]
    return positions


def cv_folds(labels: torch.Tensor, n_folds: int = 4) -> list[Fold]:
    """Cross-validation folds over shot positions of a K-shot set.

    The rule: with ``k`` the smallest number of shots of any class, use ``min(n_folds, k)`` folds; fold ``j``
    holds out, in every class, the shots whose position within their class is ``j`` modulo the number of folds.
    Every class is thus in every training part and every validation part. With one shot per class (or
    ``n_folds < 2``) there is nothing to hold out and no folds are returned: adapters then use their defaults.

    Args:
        labels: Labels of the K-shot set (N,), in the order the shots were drawn.
        n_folds: The most folds to use.

    Returns:
        A list of (train indices, validation indices) pairs.
    """
    if len(labels) == 0:
        raise LipkitError("the K-shot set is empty")
    counts = torch.bincount(labels)
    n = min(n_folds, int(counts[counts > 0].min()))
    if n < 2:
        return []
    fold_of = shot_positions(labels) % n
    return [((fold_of != j).nonzero().flatten(), (fold_of == j).nonzero().flatten()) for j in range(n)]


def select_on_folds(feats: torch.Tensor, labels: torch.Tensor, folds: Sequence[Fold], scorer: Scorer) -> int:
    """The candidate with the best validation accuracy, pooled over all folds.

    Ties, common when there are few validation shots, go to the lower validation cross-entropy, then to the
    earliest candidate.

    Args:
        feats: K-shot features (N, D).
        labels: K-shot labels (N,).
        folds: Validation folds from :func:`cv_folds` (at least one).
        scorer: Yields, for one fold, each candidate's validation logits in a fixed candidate order.

    Returns:
        The index of the chosen candidate.
    """
    if not folds:
        raise LipkitError("hyper-parameter selection needs at least one validation fold")
    correct, loss = 0, 0
    for train, val in folds:
        val_labels = labels[val]
        fold = [
            ((logits.argmax(-1) == val_labels).sum(), F.cross_entropy(logits.float(), val_labels, reduction="sum"))
            for logits in scorer(feats[train], labels[train], feats[val])
        ]
        correct = correct + torch.stack([c for c, _ in fold]).cpu()
        loss = loss + torch.stack([ce for _, ce in fold]).double().cpu()
    best = correct == correct.max()  # (n_candidates,)
    return int(torch.where(best, loss, torch.inf).argmin())  # argmin: the first of equal minima


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent, counted as every classification metric is (:mod:`lipkit.eval.metrics`)."""
    counts = count_predictions(logits, labels, logits.shape[1], ks=(1,))
    return metrics_from_counts(counts)["top1"]


@ADAPTERS.register("zeroshot")
def fit_zeroshot(
    feats: torch.Tensor, labels: torch.Tensor, zeroshot_weights: torch.Tensor, folds: Sequence[Fold], *, seed: int = 0
) -> Adapted:
    """The zero-shot baseline: ignores the shots, logits ``100 * f @ W.T``."""
    return Adapted(lambda x: zeroshot_logits(x, zeroshot_weights))

"""GDA: Gaussian discriminant analysis on the shots, ensembled with the zero-shot classifier.

Each class is a Gaussian with its own mean and one covariance shared by all classes. Bayes' rule then gives a
linear classifier in closed form: with precision ``P`` (the inverse shared covariance) and class means ``mu_c``,
``w_c = P mu_c`` and ``b_c = -mu_c^T P mu_c / 2`` (plus the log prior, uniform here, hence dropped). The
covariance is shrunk towards a scaled identity, with the Ledoit-Wolf intensity by default, because with few
shots it is far from full rank. The final logits are ``100 f W_zs^T + alpha (f W^T + b)``, ``alpha`` chosen on
validation folds of the shots.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from lipkit.errors import LipkitError
from lipkit.eval.adapters.base import ADAPTERS, Adapted, Fold, select_on_folds, zeroshot_logits

GDA_ALPHAS = tuple(10.0 ** (e / 2) for e in range(-8, 9))  # 1e-4 ... 1e4 in half decades


def ledoit_wolf_shrinkage(centered: torch.Tensor) -> float:
    """The Ledoit-Wolf (2004) shrinkage intensity of a covariance towards a scaled identity.

    Args:
        centered: Centred samples (N, D).

    Returns:
        The intensity in [0, 1] that minimises the estimated squared error of
        ``(1 - s) S + s tr(S)/D I`` with ``S = X^T X / N``.
    """
    x = centered.double()
    n, d = x.shape
    emp = x.T @ x / n  # (D, D)
    mu = emp.trace() / d
    dispersion = (emp.square().sum() - d * mu**2) / d  # ||S - mu I||_F^2 / D
    # the sample-to-sample variance of x x^T around S: sum_i ||x_i||^4 / N - ||S||_F^2, over N D
    noise = (x.square().sum(1).square().sum() / n - emp.square().sum()) / (n * d)
    if dispersion <= 0:
        return 1.0
    return float((torch.clamp(noise, min=0.0) / dispersion).clamp(max=1.0))


def gda_classifier(
    feats: torch.Tensor, labels: torch.Tensor, n_classes: int, shrinkage: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The closed-form GDA classifier of the shots.

    The shared covariance is pooled over the classes (divided by N - C). With one shot per class there is no
    within-class spread to measure, so the spread of the shots around their overall mean stands in for it.

    Args:
        feats: Shot features (N, D).
        labels: Shot labels (N,); every class needs at least one.
        n_classes: Number of classes C.
        shrinkage: Intensity towards ``tr(S)/D I``; None for Ledoit-Wolf's.

    Returns:
        Weights (C, D), bias (C,) and the shrinkage used.
    """
    x = feats.double()
    counts = torch.bincount(labels, minlength=n_classes)
    if bool((counts == 0).any()):
        raise LipkitError(f"GDA needs a shot of every class; class {int((counts == 0).nonzero()[0])} has none")
    means = torch.zeros(n_classes, x.shape[1], dtype=x.dtype, device=x.device).index_add_(0, labels, x)
    means = means / counts[:, None]  # (C, D)
    if len(x) > n_classes:
        centered, dof = x - means[labels], len(x) - n_classes
    else:
        centered, dof = x - x.mean(0), max(len(x) - 1, 1)
    cov = centered.T @ centered / dof  # (D, D)
    s = ledoit_wolf_shrinkage(centered) if shrinkage is None else float(shrinkage)
    eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
    precision = torch.linalg.pinv((1.0 - s) * cov + s * cov.trace() / x.shape[1] * eye, hermitian=True)
    weight = means @ precision  # (C, D); P is symmetric
    bias = -0.5 * (weight * means).sum(-1)
    return weight.to(feats.dtype), bias.to(feats.dtype), s


def balanced_weight(zs_logits: torch.Tensor, other_logits: torch.Tensor) -> float:
    """The weight that gives ``other_logits`` the same mean spread across classes as ``zs_logits``."""
    spread = other_logits.std(dim=-1).mean()
    return float(zs_logits.std(dim=-1).mean() / spread) if spread > 0 else 1.0


@ADAPTERS.register("gda")
def fit_gda(
    feats: torch.Tensor,
    labels: torch.Tensor,
    zeroshot_weights: torch.Tensor,
    folds: Sequence[Fold],
    *,
    seed: int = 0,
    alphas: Sequence[float] = GDA_ALPHAS,
    shrinkage: float | None = None,
) -> Adapted:
    """GDA ensembled with zero-shot; ``alpha`` chosen on the folds.

    Without folds (one shot per class) ``alpha`` is set so that both classifiers' logits have the same spread
    across classes on the shots: a scale match, not a tuned value.

    Args:
        feats: K-shot features (N, D).
        labels: K-shot labels (N,).
        zeroshot_weights: Zero-shot class embeddings (C, D).
        folds: Validation folds.
        seed: Unused (nothing is random).
        alphas: Ensemble-weight candidates, in order of preference for ties.
        shrinkage: Covariance shrinkage; None for Ledoit-Wolf's.
    """
    n_classes = zeroshot_weights.shape[0]

    def scorer(
        train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        weight, bias, _ = gda_classifier(train_feats, train_labels, n_classes, shrinkage)
        zs, gda = zeroshot_logits(val_feats, zeroshot_weights), val_feats @ weight.T + bias
        for alpha in alphas:
            yield zs + alpha * gda

    weight, bias, s = gda_classifier(feats, labels, n_classes, shrinkage)
    if folds:
        alpha = alphas[select_on_folds(feats, labels, folds, scorer)]
    else:
        alpha = balanced_weight(zeroshot_logits(feats, zeroshot_weights), feats @ weight.T + bias)
    return Adapted(
        lambda x: zeroshot_logits(x, zeroshot_weights) + alpha * (x @ weight.T + bias), {"alpha": alpha, "shrinkage": s}
    )

"""Linear probe: multinomial logistic regression on frozen image features.

Fitting is full-batch L-BFGS in torch from a zero start, so it is deterministic and runs on any device.
Features are standardised with statistics of the samples being fitted. The L2 strength is chosen on a
validation split carved out of the training features, then the probe is refitted on all of them; the
test features and labels are only used for the final score.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from lipkit.errors import LipkitError
from lipkit.eval.metrics import classification_metrics

DEFAULT_L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class LogisticProbe:
    """A fitted probe: ``scores(x) = ((x - mean) / std) @ weight.T + bias``."""

    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)
    mean: torch.Tensor  # (D,)
    std: torch.Tensor  # (D,)

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (N, C) of features (N, D)."""
        x = (features.to(self.weight) - self.mean) / self.std
        return x @ self.weight.T + self.bias


def logistic_regression(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, *, max_iter: int, history_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise mean cross-entropy + ``l2 / 2 * ||W||^2`` (the bias is not penalised) with L-BFGS from zero.

    The fit runs on the device of ``features``, in float32, and is deterministic.

    Args:
        features: Training features (N, D), used as given.
        labels: Class indices (N,).
        num_classes: C.
        l2: Regularisation strength.
        max_iter: L-BFGS iterations.
        history_size: L-BFGS memory (curvature pairs kept).

    Returns:
        Weights (C, D) and bias (C,).
    """
    x, y = features.float(), labels.to(features.device, torch.long)
    weight = torch.zeros(num_classes, x.shape[1], device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=history_size, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    l2: float,
    device: torch.device | str = "cpu",
    max_iter: int = 100,
) -> LogisticProbe:
    """Standardise the features, then fit :func:`logistic_regression` (with an L-BFGS memory of 10) to them.

    Args:
        features: Training features (N, D).
        labels: Class indices (N,).
        num_classes: C.
        l2: Regularisation strength.
        device: Where to fit.
        max_iter: L-BFGS iterations.
    """
    x = features.to(device, torch.float32)
    mean, std = x.mean(dim=0), x.std(dim=0, unbiased=False).clamp(min=1e-6)
    weight, bias = logistic_regression((x - mean) / std, labels, num_classes, l2, max_iter=max_iter, history_size=10)
    return LogisticProbe(weight, bias, mean, std)


def validation_split(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (fit, val) of a seeded random split of ``n`` training samples."""
    n_val = round(n * val_fraction)
    if not 0 < n_val < n:
        raise LipkitError(f"cannot carve a validation split of {val_fraction:.0%} out of {n} training samples")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[n_val:], order[:n_val]


def select_l2(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    max_iter: int = 100,
    progress: bool = False,
) -> tuple[float, float, list[dict[str, float]]]:
    """Choose the L2 strength with the best validation top-1 on a split of the training features.

    Ties go to the stronger regularisation.

    Returns:
        The chosen strength, its validation top-1 (percent), and ``{"l2", "val_top1"}`` per grid value.
    """
    if not grid:
        raise LipkitError("the L2 grid is empty")
    fit, val = validation_split(features.shape[0], val_fraction, seed)
    table = []
    for l2 in tqdm(sorted(grid, reverse=True), desc="L2 search", unit="fit", disable=not progress):
        probe = fit_logistic(features[fit], labels[fit], num_classes, l2, device, max_iter)
        scores = probe.scores(features[val].to(device))
        table.append({"l2": l2, "val_top1": classification_metrics(scores, labels[val], num_classes, ks=(1,))["top1"]})
    best = max(table, key=lambda row: row["val_top1"])  # first maximum = strongest regularisation
    return best["l2"], best["val_top1"], sorted(table, key=lambda row: row["l2"])


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int | None = None,
    grid: Sequence[float] = DEFAULT_L2_GRID,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str = "cpu",
    max_iter: int = 100,
    progress: bool = False,
) -> dict[str, Any]:
    """Fit a logistic-regression probe on training features and score it on test features.

    Args:
        train_features: (N, D) frozen features of the training images.
        train_labels: (N,) their classes.
        test_features: (M, D) features of the test images.
        test_labels: (M,) their classes; used for the final score only.
        num_classes: C (default: the largest training label + 1).
        grid: L2 strengths to try.
        val_fraction: Share of the training samples held out to choose the strength.
        seed: Seed of the validation split.
        device: Where to fit (``cpu``, ``cuda``...).
        max_iter: L-BFGS iterations per fit.
        progress: Show a progress bar over the grid.

    Returns:
        ``l2`` (the chosen strength), ``val_top1``, the test
        :func:`~lipkit.eval.metrics.classification_metrics` and ``l2_search``
        (validation top-1 for every strength).
    """
    if train_features.shape[1] != test_features.shape[1]:
        raise LipkitError(
            f"train features are {train_features.shape[1]}-d but test features {test_features.shape[1]}-d"
        )
    num_classes = num_classes or int(train_labels.max()) + 1
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise LipkitError(
            f"training labels range over {int(train_labels.min())}..{int(train_labels.max())}, not 0..{num_classes - 1}"
        )
    l2, val_top1, table = select_l2(
        train_features, train_labels, num_classes, grid, val_fraction, seed, device, max_iter, progress
    )
    probe = fit_logistic(train_features, train_labels, num_classes, l2, device, max_iter)
    scores = probe.scores(test_features.to(device)).cpu()
    return {
        "l2": l2,
        "val_top1": val_top1,
        **classification_metrics(scores, test_labels, num_classes),
        "l2_search": table,
    }

"""Linear probe: :func:`~lipkit.eval.linear_probe.logistic_regression` on frozen K-shot features."""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import TypeVar

import torch

from lipkit.eval.adapters.base import ADAPTERS, Adapted, Fold, select_on_folds
from lipkit.eval.linear_probe import logistic_regression

# L2 strengths tried on validation, strongest first (ties go to the stronger one)
PROBE_L2_GRID = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
PROBE_DEFAULT_L2 = 1e-2  # used when there is no validation fold (one shot per class)
PROBE_MAX_ITER = 200
PROBE_HISTORY_SIZE = 20  # L-BFGS memory

T = TypeVar("T")


def _renamed(value: T, old_value: T | None, old: str, new: str) -> T:
    """``old_value`` when the deprecated option ``old`` was given (with a warning), else ``value``."""
    if old_value is None:
        return value
    warnings.warn(f"the linear_probe option {old!r} is deprecated; use {new!r}", DeprecationWarning, stacklevel=3)
    return old_value


@ADAPTERS.register("linear_probe")
def fit_linear_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    zeroshot_weights: torch.Tensor,
    folds: Sequence[Fold],
    *,
    seed: int = 0,
    l2_grid: Sequence[float] = PROBE_L2_GRID,
    default_l2: float = PROBE_DEFAULT_L2,
    max_iter: int = PROBE_MAX_ITER,
    weight_decays: Sequence[float] | None = None,
    default_weight_decay: float | None = None,
) -> Adapted:
    """Logistic regression on the shots; its L2 strength is chosen on the validation folds.

    Args:
        feats: K-shot features (N, D).
        labels: K-shot labels (N,).
        zeroshot_weights: Zero-shot class embeddings (C, D); only their number is used.
        folds: Validation folds; with none, ``default_l2`` is used.
        seed: Unused (the fit is deterministic).
        l2_grid: Candidate strengths, in order of preference for ties.
        default_l2: The strength without validation.
        max_iter: L-BFGS iterations per fit.
        weight_decays: Deprecated name of ``l2_grid``.
        default_weight_decay: Deprecated name of ``default_l2``.
    """
    l2_grid = _renamed(l2_grid, weight_decays, "weight_decays", "l2_grid")
    default_l2 = _renamed(default_l2, default_weight_decay, "default_weight_decay", "default_l2")
    n_classes = zeroshot_weights.shape[0]

    def fit(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, torch.Tensor]:
        return logistic_regression(x, y, n_classes, l2, max_iter=max_iter, history_size=PROBE_HISTORY_SIZE)

    def scorer(
        train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        for l2 in l2_grid:
            weight, bias = fit(train_feats, train_labels, l2)
            yield val_feats @ weight.T + bias

    l2 = l2_grid[select_on_folds(feats, labels, folds, scorer)] if folds else default_l2
    weight, bias = fit(feats, labels, l2)
    return Adapted(lambda x: x @ weight.T + bias, {"l2": l2})

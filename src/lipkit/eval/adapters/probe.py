"""Linear probe: multinomial logistic regression on frozen K-shot features, fitted with L-BFGS."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from lipkit.eval.adapters.base import ADAPTERS, Adapted, Fold, select_on_folds

# L2 penalties tried on validation, strongest first (ties go to the stronger one)
PROBE_WEIGHT_DECAYS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 3e-4, 1e-4)
PROBE_DEFAULT_WEIGHT_DECAY = 1e-2  # used when there is no validation fold (one shot per class)


def logistic_regression(
    feats: torch.Tensor, labels: torch.Tensor, n_classes: int, weight_decay: float, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise the mean cross-entropy plus ``weight_decay / 2 * ||W||^2`` (the bias is not penalised).

    Args:
        feats: Features (N, D).
        labels: Labels (N,).
        n_classes: Number of classes C.
        weight_decay: The L2 penalty on the weights.
        max_iter: L-BFGS iterations.

    Returns:
        Weights (C, D) and bias (C,).
    """
    feats = feats.float()
    weight = torch.zeros(n_classes, feats.shape[1], device=feats.device, requires_grad=True)
    bias = torch.zeros(n_classes, device=feats.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-7, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(feats @ weight.T + bias, labels) + 0.5 * weight_decay * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weight.detach(), bias.detach()


@ADAPTERS.register("linear_probe")
def fit_linear_probe(
    feats: torch.Tensor,
    labels: torch.Tensor,
    zeroshot_weights: torch.Tensor,
    folds: Sequence[Fold],
    *,
    seed: int = 0,
    weight_decays: Sequence[float] = PROBE_WEIGHT_DECAYS,
    default_weight_decay: float = PROBE_DEFAULT_WEIGHT_DECAY,
    max_iter: int = 200,
) -> Adapted:
    """Logistic regression on the shots; its L2 penalty is chosen on the validation folds.

    Args:
        feats: K-shot features (N, D).
        labels: K-shot labels (N,).
        zeroshot_weights: Zero-shot class embeddings (C, D); only their number is used.
        folds: Validation folds; with none, ``default_weight_decay`` is used.
        seed: Unused (the fit is deterministic).
        weight_decays: Candidate penalties, in order of preference for ties.
        default_weight_decay: The penalty without validation.
        max_iter: L-BFGS iterations per fit.
    """
    n_classes = zeroshot_weights.shape[0]

    def scorer(
        train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        for wd in weight_decays:
            weight, bias = logistic_regression(train_feats, train_labels, n_classes, wd, max_iter)
            yield val_feats @ weight.T + bias

    wd = weight_decays[select_on_folds(feats, labels, folds, scorer)] if folds else default_weight_decay
    weight, bias = logistic_regression(feats, labels, n_classes, wd, max_iter)
    return Adapted(lambda x: x @ weight.T + bias, {"weight_decay": wd})

"""Tip-Adapter: the K-shot features and their one-hot labels as a key-value cache, blended with zero-shot logits.

``logits = 100 f W_zs^T + alpha * exp(-beta (1 - f K^T)) V`` with keys ``K`` the shots' features and values ``V``
their one-hot labels. Tip-Adapter uses the cache as is (training-free); Tip-Adapter-F fine-tunes the keys for a
few epochs. The blend ``alpha`` and sharpness ``beta`` are chosen on validation folds of the shots, never on the
test set (the reference code tunes them on test).

Differences from the reference, because adapters here see frozen features rather than images: no augmented
views are averaged into the keys, and while fine-tuning, each shot's own cache entry is masked out of its
logits (otherwise it would find itself in the cache at affinity 1 and learn nothing).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from lipkit.eval.adapters.base import ADAPTERS, Adapted, Fold, one_hot, select_on_folds, zeroshot_logits

TIP_BETAS = (0.5, 1.0, 2.0, 3.0, 5.5, 7.0, 10.0)
TIP_ALPHAS = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0)
TIP_DEFAULT_ALPHA, TIP_DEFAULT_BETA = 1.0, 5.5  # the paper's ImageNet setting; used without validation folds


def cache_logits(feats: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beta: float) -> torch.Tensor:
    """The cache's logits ``exp(-beta (1 - f K^T)) V``: features (N, D), keys (M, D), values (M, C) -> (N, C)."""
    return torch.exp(-beta * (1.0 - feats @ keys.T)) @ values


def tip_logits(
    feats: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    zeroshot_weights: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Tip-Adapter's logits (N, C): zero-shot logits plus ``alpha`` times the cache's logits.

    Args:
        feats: L2-normalised image features (N, D).
        keys: Cache keys (M, D): the shots' features, or fine-tuned ones.
        values: Cache values (M, C): the shots' one-hot labels.
        zeroshot_weights: Zero-shot class embeddings (C, D).
        alpha: Weight of the cache; 0 gives the zero-shot logits exactly.
        beta: Sharpness of the affinities.
    """
    return zeroshot_logits(feats, zeroshot_weights) + alpha * cache_logits(feats, keys, values, beta)


def finetune_keys(
    feats: torch.Tensor,
    labels: torch.Tensor,
    zeroshot_weights: torch.Tensor,
    alpha: float = TIP_DEFAULT_ALPHA,
    beta: float = TIP_DEFAULT_BETA,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    seed: int = 0,
) -> torch.Tensor:
    """Tip-Adapter-F: train the cache keys with cross-entropy on the shots (AdamW, cosine schedule).

    Args:
        feats: K-shot features (N, D); the keys start from them.
        labels: K-shot labels (N,).
        zeroshot_weights: Zero-shot class embeddings (C, D).
        alpha: Cache weight during training.
        beta: Sharpness during training.
        epochs: Passes over the shots.
        lr: Learning rate.
        batch_size: Shots per step.
        seed: Seeds the order of the shots.

    Returns:
        The fine-tuned keys (N, D).
    """
    keys = feats.detach().clone().float().requires_grad_(True)
    values = one_hot(labels, zeroshot_weights.shape[0])
    zs = zeroshot_logits(feats, zeroshot_weights)  # (N, C), fixed
    opt = torch.optim.AdamW([keys], lr=lr, eps=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(feats) / batch_size))
    generator = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for batch in torch.randperm(len(feats), generator=generator).to(feats.device).split(batch_size):
                not_self = torch.ones(len(batch), len(feats), device=feats.device)
                not_self[torch.arange(len(batch), device=feats.device), batch] = (
                    0.0  # (B, N): a shot does not see its own entry
                )
                affinity = torch.exp(-beta * (1.0 - feats[batch] @ keys.T)) * not_self
                loss = F.cross_entropy(zs[batch] + alpha * affinity @ values, labels[batch])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
    return keys.detach()


def _fit_tip(
    feats: torch.Tensor,
    labels: torch.Tensor,
    zeroshot_weights: torch.Tensor,
    folds: Sequence[Fold],
    make_keys: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    betas: Sequence[float],
    alphas: Sequence[float],
) -> Adapted:
    """Choose (alpha, beta) on the folds, then build the cache from all shots."""
    n_classes = zeroshot_weights.shape[0]

    def scorer(
        train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor
    ) -> Iterator[torch.Tensor]:
        keys, values = make_keys(train_feats, train_labels), one_hot(train_labels, n_classes)
        zs = zeroshot_logits(val_feats, zeroshot_weights)
        for beta in betas:
            cache = cache_logits(val_feats, keys, values, beta)
            for alpha in alphas:
                yield zs + alpha * cache

    alpha, beta = TIP_DEFAULT_ALPHA, TIP_DEFAULT_BETA
    if folds:
        beta, alpha = [(b, a) for b in betas for a in alphas][select_on_folds(feats, labels, folds, scorer)]
    keys, values = make_keys(feats, labels), one_hot(labels, n_classes)
    return Adapted(lambda x: tip_logits(x, keys, values, zeroshot_weights, alpha, beta), {"alpha": alpha, "beta": beta})


@ADAPTERS.register("tip_adapter")
def fit_tip_adapter(
    feats: torch.Tensor,
    labels: torch.Tensor,
    zeroshot_weights: torch.Tensor,
    folds: Sequence[Fold],
    *,
    seed: int = 0,
    betas: Sequence[float] = TIP_BETAS,
    alphas: Sequence[float] = TIP_ALPHAS,
) -> Adapted:
    """Training-free Tip-Adapter; (alpha, beta) from a grid, on the folds (defaults 1 and 5.5 without folds).

    Args:
        feats: K-shot features (N, D).
        labels: K-shot labels (N,).
        zeroshot_weights: Zero-shot class embeddings (C, D).
        folds: Validation folds.
        seed: Unused (nothing is random).
        betas: Sharpness candidates.
        alphas: Blend candidates.
    """
    return _fit_tip(feats, labels, zeroshot_weights, folds, lambda f, _: f, betas, alphas)


@ADAPTERS.register("tip_adapter_f")
def fit_tip_adapter_f(
    feats: torch.Tensor,
    labels: torch.Tensor,
    zeroshot_weights: torch.Tensor,
    folds: Sequence[Fold],
    *,
    seed: int = 0,
    betas: Sequence[float] = TIP_BETAS,
    alphas: Sequence[float] = TIP_ALPHAS,
    epochs: int = 20,
    lr: float = 1e-3,
    batch_size: int = 256,
    train_alpha: float | None = None,
    train_beta: float | None = None,
) -> Adapted:
    """Tip-Adapter-F: cache keys fine-tuned on the shots, then (alpha, beta) chosen on the folds.

    The keys are trained at the (alpha, beta) that training-free Tip-Adapter chooses on the same folds (the
    reference trains at fixed initial values; matching the training blend to the one the cache will be used at
    works better when zero-shot is weak). Each fold then fine-tunes its own keys on its training part, so
    validation shots never shape the keys that score them; the final keys are fine-tuned on all shots.

    Args:
        feats: K-shot features (N, D).
        labels: K-shot labels (N,).
        zeroshot_weights: Zero-shot class embeddings (C, D).
        folds: Validation folds.
        seed: Seeds the order of the shots in fine-tuning.
        betas: Sharpness candidates.
        alphas: Blend candidates.
        epochs: Fine-tuning epochs.
        lr: Fine-tuning learning rate.
        batch_size: Fine-tuning batch size.
        train_alpha: Cache weight while fine-tuning; None for training-free Tip-Adapter's choice.
        train_beta: Sharpness while fine-tuning; None for training-free Tip-Adapter's choice.
    """
    if train_alpha is None or train_beta is None:
        chosen = fit_tip_adapter(feats, labels, zeroshot_weights, folds, betas=betas, alphas=alphas).params
        train_alpha = chosen["alpha"] if train_alpha is None else train_alpha
        train_beta = chosen["beta"] if train_beta is None else train_beta

    def make_keys(f: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return finetune_keys(f, y, zeroshot_weights, train_alpha, train_beta, epochs, lr, batch_size, seed)

    adapted = _fit_tip(feats, labels, zeroshot_weights, folds, make_keys, betas, alphas)
    adapted.params.update(train_alpha=train_alpha, train_beta=train_beta)
    return adapted

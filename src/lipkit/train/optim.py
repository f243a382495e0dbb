"""AdamW parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from lipkit.train.config import OptimConfig

FUSED_DEVICES = ("cuda", "cpu")  # where torch.optim.AdamW(fused=True) has a kernel
NO_DECAY_NAMES = ("logit_scale", "logit_bias", "cls_token", "pos_embed", "token_embed", "latent", "gamma")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (weight matrices) and an undecayed one
    (norms, biases, embeddings, the temperature and bias scalars, layer scales)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        skip = param.ndim < 2 or any(part in NO_DECAY_NAMES for part in name.split(".")) or "embed" in leaf
        (no_decay if skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, fused on CUDA and CPU.

    The fused kernel updates every parameter in one vectorised pass; on CPU, PyTorch's default is a Python
    loop of per-tensor ops, slowest for large embedding tables. docs/benchmarks.md ("Training step on CPU")
    times the training step with each.
    """
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        fused=device.type in FUSED_DEVICES,
    )


def lr_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Learning rate at ``step``: linear warmup, then cosine, linear or constant to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    progress = min(1.0, progress)
    if cfg.schedule == "linear":
        factor = 1.0 - progress
    else:
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * factor

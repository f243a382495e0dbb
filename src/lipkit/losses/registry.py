"""The loss registry, the base class of registered losses and what they read from the model output.

Loss modules register their classes here; :mod:`lipkit.losses` imports them all, so that the registry is
complete whenever the package is imported.
"""

from __future__ import annotations

from typing import Protocol

from torch import Tensor, nn

from lipkit.registry import Registry


class LossInputs(Protocol):
    """What a loss module reads from the model output."""

    image_features: Tensor
    text_features: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None


class Loss(nn.Module):
    """Base of the registered losses: a stateless module whose ``forward`` takes the model output.

    Attributes:
        needs_bias: The loss reads ``logit_bias``, so the model must be built with one.
        distributed_form: The registered name of the loss that computes this one over the global batch
            of all processes, or ``None`` when it has no such form.
    """

    needs_bias: bool = False
    distributed_form: str | None = None

    def __init__(self) -> None:  # explicit, so create_loss can reject unknown keyword arguments
        super().__init__()


LOSSES: Registry[type[Loss]] = Registry("loss")

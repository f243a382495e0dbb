"""Contrastive losses for dual encoders, looked up by name.

Each loss is a pure function on (image features, text features, scale[, bias]) plus a stateless
``nn.Module`` wrapper whose ``forward`` takes the model output. The learnable temperature and bias live in
the model, so the wrappers hold no parameters.

Example:
    >>> loss_fn = create_loss("siglip")
    >>> loss = loss_fn(model_output)
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

from torch import Tensor, nn

from lipkit.errors import ConfigError
from lipkit.registry import Registry

LOSSES: Registry[type[nn.Module]] = Registry("loss")


class LossInputs(Protocol):
    """What a loss module reads from the model output."""

    image_features: Tensor
    text_features: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None


# The loss modules register themselves into LOSSES on import, so they are imported after it exists.
from lipkit.losses.contrastive import InfoNCELoss, infonce_loss  # noqa: E402
from lipkit.losses.distributed import (  # noqa: E402
    DistributedInfoNCELoss,
    DistributedSigmoidLoss,
    DistributedStreamingInfoNCELoss,
    RingSigmoidLoss,
)
from lipkit.losses.sigmoid import SigmoidLoss, sigmoid_loss  # noqa: E402
from lipkit.losses.streaming import (  # noqa: E402
    StreamingInfoNCELoss,
    StreamingSigmoidLoss,
    streaming_infonce_loss,
    streaming_sigmoid_loss,
)

__all__ = [
    "LOSSES",
    "DistributedInfoNCELoss",
    "DistributedSigmoidLoss",
    "DistributedStreamingInfoNCELoss",
    "InfoNCELoss",
    "LossInputs",
    "RingSigmoidLoss",
    "SigmoidLoss",
    "StreamingInfoNCELoss",
    "StreamingSigmoidLoss",
    "create_loss",
    "infonce_loss",
    "sigmoid_loss",
    "streaming_infonce_loss",
    "streaming_sigmoid_loss",
]


def create_loss(name: str, **kwargs: Any) -> nn.Module:
    """Build the loss registered under ``name``.

    Args:
        name: A registered loss name, e.g. ``"infonce"`` or ``"siglip"``.
        **kwargs: Constructor arguments of that loss.

    Returns:
        The loss module.

    Raises:
        UnknownNameError: ``name`` is not registered.
        ConfigError: ``kwargs`` do not fit the loss's constructor.
    """
    cls = LOSSES.get(name)
    try:
        inspect.signature(cls).bind(**kwargs)
    except TypeError as err:
        raise ConfigError(f"loss {name!r}: {err}") from None
    return cls(**kwargs)

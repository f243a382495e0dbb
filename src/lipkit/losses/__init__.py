"""Contrastive losses for dual encoders, looked up by name.

Each loss is a pure function on (image features, text features, scale[, bias]) plus a stateless
:class:`~lipkit.losses.registry.Loss` module whose ``forward`` takes the model output. The learnable
temperature and bias live in the model, so the modules hold no parameters. Importing this package
registers every loss in :data:`LOSSES`.

Example:
    >>> loss_fn = create_loss("siglip")
    >>> loss = loss_fn(model_output)
"""

from __future__ import annotations

import inspect
from typing import Any

from lipkit.errors import ConfigError
from lipkit.losses.caption import CoCaLoss, caption_loss
from lipkit.losses.contrastive import InfoNCELoss, infonce_loss
from lipkit.losses.distributed import (
    DistributedInfoNCELoss,
    DistributedSigmoidLoss,
    DistributedStreamingInfoNCELoss,
    RingSigmoidLoss,
)
from lipkit.losses.registry import LOSSES, Loss, LossInputs
from lipkit.losses.sigmoid import SigmoidLoss, sigmoid_loss
from lipkit.losses.streaming import (
    StreamingInfoNCELoss,
    StreamingSigmoidLoss,
    streaming_infonce_loss,
    streaming_sigmoid_loss,
)

__all__ = [
    "LOSSES",
    "CoCaLoss",
    "DistributedInfoNCELoss",
    "DistributedSigmoidLoss",
    "DistributedStreamingInfoNCELoss",
    "InfoNCELoss",
    "Loss",
    "LossInputs",
    "RingSigmoidLoss",
    "SigmoidLoss",
    "StreamingInfoNCELoss",
    "StreamingSigmoidLoss",
    "caption_loss",
    "create_loss",
    "infonce_loss",
    "sigmoid_loss",
    "streaming_infonce_loss",
    "streaming_sigmoid_loss",
]


def create_loss(name: str, **kwargs: Any) -> Loss:
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

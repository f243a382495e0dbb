"""Any timm image model as an image tower, with a projection head."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from lipkit.errors import CheckpointError, LipkitError
from lipkit.models.config import TimmConfig
from lipkit.models.folding import fold_when_frozen
from lipkit.models.text import make_head, resolve_local_path

CLASSIFIER_NAMES = ("classifier", "fc", "head", "_fc", "head.fc")  # where weight files keep the classifier


def map_keys_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename ``source``'s tensors to ``target``'s keys by position, checking every shape.

    For weights saved by another implementation of the same architecture, whose parameters come in
    the same order under other names (e.g. EfficientNet-Lite0 weights onto timm's ``efficientnet_lite0``).
    """
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise CheckpointError(f"ordered key mapping: checkpoint has {len(src)} tensors, model has {len(dst)}")
    out = {}
    for (src_key, tensor), dst_key in zip(src, dst):
        if tuple(tensor.shape) != tuple(target[dst_key].shape):
            raise CheckpointError(
                f"ordered key mapping: {src_key} {tuple(tensor.shape)} does not fit "
                f"{dst_key} {tuple(target[dst_key].shape)}"
            )
        out[dst_key] = tensor
    return out


def load_local_weights(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a ``.pt``/``.pth``/``.bin`` or ``.safetensors`` file."""
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class TimmTower(nn.Module):
    """A timm backbone, globally pooled, then projected to ``embed_dim``.

    The projection is a head of lipkit's (``proj``: linear or MLP), or timm's own classifier built with
    ``embed_dim`` outputs (``proj: classifier``), as OpenCLIP's timm towers do.

    Args:
        cfg: Tower config; ``cfg.pretrained`` is a local weights file (nothing is downloaded).
        embed_dim: Width of the shared embedding space.
    """

    def __init__(self, cfg: TimmConfig, embed_dim: int) -> None:
        super().__init__()
        try:
            import timm
        except ImportError:
            raise LipkitError("timm image towers need `pip install 'lipkit[towers]'`") from None
        self.cfg = cfg
        # with proj "classifier", timm builds its classifier with embed_dim outputs; it becomes ``proj``
        kwargs = {"num_classes": embed_dim if cfg.proj == "classifier" else 0}
        if cfg.pool:
            kwargs["global_pool"] = cfg.pool
        try:
            self.trunk = timm.create_model(cfg.name, pretrained=False, **kwargs)
        except (RuntimeError, ValueError, TypeError, AssertionError) as exc:
            raise LipkitError(f"timm cannot build {cfg.name!r} with {kwargs}: {exc}") from None
        self.classifier_path = ""  # where timm keeps the classifier that is the projection (OpenCLIP's names)
        if cfg.proj == "classifier":
            self.classifier_path = self.trunk.pretrained_cfg.get("classifier") or "head"
            self.proj = self.trunk.get_classifier()
            # the trunk now ends with the pooled feature, as with no classifier; the projection is ours
            self.trunk.set_submodule(self.classifier_path, nn.Identity())
        else:
            width = self.trunk.num_features
            self.proj = make_head(width, embed_dim, cfg.proj, cfg.proj_bias, cfg.proj_hidden, cfg.mlp_bias)
        if cfg.pretrained:
            self.load_trunk(resolve_local_path(cfg.pretrained))
        self.output_dim = embed_dim
        self.folded: int | None = None  # BatchNorm layers folded (fold_batchnorm), None until first tried

    def load_trunk(self, path: Path) -> None:
        """Load backbone weights from ``path`` (classifier weights in the file are ignored)."""
        state = load_local_weights(path)
        target = self.trunk.state_dict()
        if self.cfg.key_map == "ordered":
            classifier = [k for k in state if k.startswith(("classifier.", "fc.", "head.", "_fc."))]
            state = map_keys_in_order({k: v for k, v in state.items() if k not in classifier}, target)
        missing, unexpected = self.trunk.load_state_dict(state, strict=False)
        unexpected = [k for k in unexpected if not k.startswith(("classifier.", "fc.", "head."))]
        if missing or unexpected:
            raise CheckpointError(
                f"{path} does not fit timm {self.cfg.name}: missing {missing}, unexpected {unexpected}"
            )

    def classifier_head(self) -> torch.Tensor:
        """The weight rows (C, num_features) of the classifier in the tower's weights file.

        The trunk drops the classifier when it loads; its rows live in the space :meth:`features` returns
        (classifier prototypes, :mod:`lipkit.data.prototypes`).

        Raises:
            LipkitError: No weights file is set, or it holds no classifier that reads these features.
        """
        if not self.cfg.pretrained:
            raise LipkitError(f"image tower timm {self.cfg.name} has no classifier head: vision.pretrained is not set")
        state = load_local_weights(resolve_local_path(self.cfg.pretrained))
        names = [self.trunk.pretrained_cfg.get("classifier") or "", *CLASSIFIER_NAMES]
        for name in names:
            weight = state.get(f"{name}.weight")
            if weight is not None and weight.ndim == 2 and weight.shape[1] == self.trunk.num_features:
                return weight.float()
        raise LipkitError(
            f"image tower timm {self.cfg.name} has no classifier head: {self.cfg.pretrained} holds no "
            f"({self.trunk.num_features}-wide) weight under {', '.join(n for n in names if n)}"
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory."""
        self.trunk.set_grad_checkpointing(enable)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled backbone feature before the projection head: (B, num_features)."""
        if self.cfg.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.folded is None and self.cfg.fold_batchnorm:
            self.folded = fold_when_frozen([self.trunk], images, self.trunk)
        return self.trunk(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed images (B, 3, H, W) into (B, embed_dim), not normalised."""
        return self.proj(self.features(images))

    def openclip_rules(self) -> list[tuple[str, str]]:
        """Key renames between OpenCLIP's layout and this tower's beyond its layout's own: OpenCLIP keeps a
        classifier used as the projection inside the trunk (``visual.trunk.head.*``), lipkit as ``visual.proj.*``."""
        if not self.classifier_path:
            return []
        return [(f"^visual.trunk.{self.classifier_path}.", "^visual.proj.")]

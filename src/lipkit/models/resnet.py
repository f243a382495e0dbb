"""OpenAI's modified ResNet image tower (CLIP's RN50, RN101, RN50x4, RN50x16, RN50x64)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.models.config import ResNetConfig
from lipkit.models.folding import fold_when_frozen

EXPANSION = 4  # a bottleneck's output has four times its inner channels


def conv_bn(channels_in: int, channels_out: int, kernel: int, stride: int = 1) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    """A bias-free convolution ('same' padding) and the batch norm that follows it."""
    conv = nn.Conv2d(channels_in, channels_out, kernel, stride=stride, padding=kernel // 2, bias=False)
    return conv, nn.BatchNorm2d(channels_out)


class Stem(nn.Module):
    """Three 3x3 convolutions (the first strided) with batch norm and ReLU, then a 2x2 average pool."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(3, width // 2, 3, stride=2)
        self.conv2, self.bn2 = conv_bn(width // 2, width // 2, 3)
        self.conv3, self.bn3 = conv_bn(width // 2, width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
            x = F.relu(bn(conv(x)))
        return F.avg_pool2d(x, 2)  # (B, width, H/4, W/4)


class Shortcut(nn.Module):
    """The projection shortcut: average-pool by the stride, then a 1x1 convolution and batch norm."""

    def __init__(self, channels_in: int, channels_out: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv, self.bn = conv_bn(channels_in, channels_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride)
        return self.bn(self.conv(x))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> (average pool by the stride) -> 1x1 convolutions, each with batch norm, plus a shortcut.

    Every convolution has stride 1: downsampling is the average pool (anti-aliased, as OpenAI's CLIP does).
    """

    def __init__(self, channels_in: int, inner: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.conv1, self.bn1 = conv_bn(channels_in, inner, 1)
        self.conv2, self.bn2 = conv_bn(inner, inner, 3)
        self.conv3, self.bn3 = conv_bn(inner, inner * EXPANSION, 1)
        needs_projection = stride > 1 or channels_in != inner * EXPANSION
        self.shortcut = Shortcut(channels_in, inner * EXPANSION, stride) if needs_projection else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        if self.stride > 1:
            out = F.avg_pool2d(out, self.stride)
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


class MeanQueryAttentionPool(nn.Module):
    """Multi-head attention pooling of a feature map, the query being the map's mean (with its position).

    Args:
        grid: Side of the feature map.
        width: Channels.
        heads: Attention heads.
    """

    def __init__(self, grid: int, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.pos_embed = nn.Parameter(torch.randn(grid * grid + 1, width) * width**-0.5)
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """Pool ``fmap`` (B, C, h, w) into (B, C)."""
        x = fmap.flatten(2).transpose(1, 2)  # (B, h*w, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos_embed.to(x.dtype)  # (B, T, C)
        B, T, C = x.shape
        hd = C // self.heads
        q = self.q(x[:, :1]).view(B, 1, self.heads, hd).transpose(1, 2)  # (B, H, 1, hd)
        k = self.k(x).view(B, T, self.heads, hd).transpose(1, 2)  # (B, H, T, hd)
        v = self.v(x).view(B, T, self.heads, hd).transpose(1, 2)
        return F.scaled_dot_product_attention(q, k, v).reshape(B, C)  # (B, H, 1, hd) -> (B, C)


class ModifiedResNet(nn.Module):
    """CLIP's ResNet image tower: stem, four bottleneck stages, mean-query attention pooling, projection.

    The attention pool's output projection is the tower's ``proj`` (width * 32 -> embed_dim, with bias),
    so :meth:`features` is the pooled feature before it, as for the other towers.

    Args:
        cfg: Architecture.
        embed_dim: Width of the shared embedding space.
    """

    def __init__(self, cfg: ResNetConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.stem = Stem(cfg.width)
        self.stages = nn.ModuleList()
        channels = cfg.width
        for i, blocks in enumerate(cfg.layers):
            inner = cfg.width * 2**i
            stride = 1 if i == 0 else 2
            stage = [Bottleneck(channels, inner, stride)]
            stage += [Bottleneck(inner * EXPANSION, inner) for _ in range(blocks - 1)]
            self.stages.append(nn.Sequential(*stage))
            channels = inner * EXPANSION
        self.attn_pool = MeanQueryAttentionPool(cfg.image_size // 32, channels, channels // cfg.head_width)
        self.proj = nn.Linear(channels, embed_dim)
        self.output_dim = embed_dim
        self.grad_checkpointing = False
        self.folded: int | None = None  # BatchNorm layers folded (fold_batchnorm), None until first tried
        self.init_weights()

    def init_weights(self) -> None:
        """Attention pool and projection at std width**-0.5; each block's last norm at zero (identity blocks)."""
        std = self.proj.in_features**-0.5
        for linear in (self.attn_pool.q, self.attn_pool.k, self.attn_pool.v, self.proj):
            nn.init.normal_(linear.weight, std=std)
        for stage in self.stages:
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each stage's activations in the backward pass to save memory."""
        self.grad_checkpointing = enable

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's output (B, width * 32, H/32, W/32)."""
        if self.cfg.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.folded is None and self.cfg.fold_batchnorm:
            self.folded = fold_when_frozen([self.stem, self.stages], images, self._convolutions)
        return self._convolutions(images)

    def _convolutions(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for stage in self.stages:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return x

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The attention-pooled feature before the projection head: (B, width * 32)."""
        return self.attn_pool(self.feature_map(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed images (B, 3, H, W) into (B, embed_dim), not normalised."""
        return self.proj(self.features(images))

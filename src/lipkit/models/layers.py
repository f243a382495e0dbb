"""Transformer building blocks shared by the image and text towers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation of OpenAI's original CLIP checkpoints."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def make_activation(name: str) -> nn.Module:
    """Build an activation from its config name (``gelu``, ``quick_gelu`` or ``gelu_tanh``)."""
    if name == "quick_gelu":
        return QuickGELU()
    if name == "gelu_tanh":
        return nn.GELU(approximate="tanh")
    return nn.GELU()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so bf16/fp16 activations stay stable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class Attention(nn.Module):
    """Multi-head self-attention through PyTorch's fused ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=qkv_bias)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, T, hd)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))  # (B, T, C)


class Mlp(nn.Module):
    """Two linear layers with an activation between them."""

    def __init__(self, width: int, hidden: int, act: str = "gelu", out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.act = make_activation(act)
        self.fc2 = nn.Linear(hidden, out or width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """A learned per-channel scale on a residual branch."""

    def __init__(self, width: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """A pre-norm transformer block: ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_ratio: float = 4.0,
        act: str = "gelu",
        qkv_bias: bool = True,
        norm_eps: float = 1e-5,
        layer_scale_init: float | None = None,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(width, eps=norm_eps)
        self.attn = Attention(width, heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(width, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.norm2 = LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), act)
        self.ls2 = LayerScale(width, layer_scale_init) if layer_scale_init is not None else nn.Identity()

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), causal=causal, mask=mask))
        return x + self.ls2(self.mlp(self.norm2(x)))


class Transformer(nn.Module):
    """A stack of pre-norm blocks, with optional activation checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, **block_kwargs: object) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(width, heads, **block_kwargs) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, causal: bool = False, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, mask, use_reentrant=False)
            else:
                x = block(x, causal=causal, mask=mask)
        return x

    def init_weights(self, width: int, layers: int) -> None:
        """CLIP-style init: projections scaled down with depth, zero biases."""
        proj_std = width**-0.5 * (2 * layers) ** -0.5
        attn_std = width**-0.5
        fc_std = (2 * width) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for lin in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)


class AttentionPool(nn.Module):
    """Multi-head attention pooling with one learned query (SigLIP's MAP head), then a residual MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, act: str = "gelu", norm_eps: float = 1e-5):
        super().__init__()
        self.heads = heads
        self.latent = nn.Parameter(torch.randn(1, 1, width) * width**-0.5)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)
        self.norm = LayerNorm(width, eps=norm_eps)
        self.mlp = Mlp(width, int(width * mlp_ratio), act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        hd = C // self.heads
        q = self.q(self.latent.expand(B, -1, -1)).view(B, 1, self.heads, hd).transpose(1, 2)  # (B, H, 1, hd)
        k, v = self.kv(x).view(B, T, 2, self.heads, hd).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, hd) each
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, 1, C)  # (B, 1, C)
        out = self.proj(out)
        out = out + self.mlp(self.norm(out))
        return out[:, 0]  # (B, C)

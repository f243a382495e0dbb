"""The Vision Transformer image tower."""

from __future__ import annotations

import torch
from torch import nn

from lipkit.models.config import ViTConfig
from lipkit.models.layers import AttentionPool, LayerNorm, QueryPool, Transformer


class VisionTransformer(nn.Module):
    """ViT image tower: patch embedding, optional class token, pre-norm blocks, pooling, projection.

    Args:
        cfg: Architecture.
        embed_dim: Width of the shared embedding space (the output width).
    """

    def __init__(self, cfg: ViTConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        width = cfg.width
        self.grid = cfg.image_size // cfg.patch_size
        self.patch_embed = nn.Conv2d(3, width, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        scale = width**-0.5
        self.cls_token = nn.Parameter(scale * torch.randn(width)) if cfg.class_token else None
        n_tokens = self.grid**2 + int(cfg.class_token)
        self.pos_embed = nn.Parameter(scale * torch.randn(n_tokens, width))
        self.norm_pre = LayerNorm(width, eps=cfg.norm_eps) if cfg.ln_pre else nn.Identity()
        self.transformer = Transformer(
            width,
            cfg.layers,
            cfg.heads,
            mlp_ratio=cfg.mlp_ratio,
            act=cfg.act,
            qkv_bias=cfg.qkv_bias,
            norm_eps=cfg.norm_eps,
            layer_scale_init=cfg.layer_scale_init,
        )
        self.attn_pool = (
            AttentionPool(width, cfg.heads, cfg.mlp_ratio, cfg.act, cfg.norm_eps) if cfg.pool == "map" else None
        )
        self.query_pool = None
        if cfg.pool == "queries":
            self.query_pool = QueryPool(embed_dim, width, cfg.pool_queries, cfg.pool_heads, cfg.norm_eps)
        pooled = embed_dim if self.query_pool is not None else width  # the query pooler's outputs are embed_dim wide
        self.norm = LayerNorm(pooled, eps=cfg.norm_eps)
        if not cfg.proj and embed_dim != pooled:
            raise ValueError(f"vision.proj is false but width {width} != embed_dim {embed_dim}")
        self.proj = nn.Linear(pooled, embed_dim, bias=cfg.proj_bias) if cfg.proj else nn.Identity()
        self.output_dim = embed_dim
        self.transformer.init_weights(width, cfg.layers)
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.transformer.grad_checkpointing = enable

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch-embed ``images`` (B, 3, H, W) and add the class token and positions: (B, T, width)."""
        x = self.patch_embed(images)  # (B, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B, grid*grid, width)
        if self.cls_token is not None:
            cls = self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1)  # (B, 1, width)
            x = torch.cat([cls, x], dim=1)
        return x + self.pos_embed.to(x.dtype)

    def drop_patches(self, x: torch.Tensor) -> torch.Tensor:
        """FLIP patch dropout: keep a random subset of patch tokens (training only; class token kept)."""
        p = self.cfg.patch_dropout
        if not self.training or p == 0.0:
            return x
        n_prefix = int(self.cls_token is not None)
        prefix, patches = x[:, :n_prefix], x[:, n_prefix:]
        B, N, C = patches.shape
        keep = max(1, int(N * (1 - p)))
        idx = torch.rand(B, N, device=x.device).argsort(dim=1)[:, :keep]  # (B, keep)
        patches = patches.gather(1, idx.unsqueeze(-1).expand(-1, -1, C))  # (B, keep, C)
        return torch.cat([prefix, patches], dim=1)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Token features (B, T, width), after the final norm unless it follows the pooling (``norm_after_pool``,
        or the ``queries`` pooler, whose outputs the norm follows)."""
        x = self.drop_patches(self.embed(images))
        x = self.transformer(self.norm_pre(x))
        return x if self.cfg.norm_after_pool or self.query_pool is not None else self.norm(x)

    def pooled_and_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled feature before the projection head (B, F) and the image tokens a captioning decoder
        reads (B, N, F), as OpenCLIP's CoCa takes them: the ``queries`` pooler's outputs after the first, or
        the normalised patch tokens."""
        x = self.forward_features(images)
        if self.query_pool is not None:
            x = self.norm(self.query_pool(x))  # (B, queries, embed_dim)
            return x[:, 0], x[:, 1:]
        tokens = x[:, int(self.cls_token is not None) :]
        pooled = self.pool(x)
        return (self.norm(pooled) if self.cfg.norm_after_pool else pooled), tokens

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pool token features (B, T, width) into one vector per image (B, width; embed_dim for ``queries``)."""
        if self.query_pool is not None:  # only the first query pools; each query attends on its own
            return self.norm(self.query_pool(x, first_only=True))[:, 0]
        if self.attn_pool is not None:
            return self.attn_pool(x)
        if self.cfg.pool == "cls":
            return x[:, 0]
        return x[:, int(self.cls_token is not None) :].mean(dim=1)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The pooled feature before the projection head: (B, width)."""
        if self.attn_pool is None and self.cfg.pool == "cls":
            # Only the first token is kept: the last block computes just that one, and the norm follows.
            x = self.transformer.forward_pooled(self.norm_pre(self.drop_patches(self.embed(images))), 0)
            return self.norm(x)
        pooled = self.pool(self.forward_features(images))
        return self.norm(pooled) if self.cfg.norm_after_pool else pooled

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embed images (B, 3, H, W) into (B, embed_dim), not normalised."""
        return self.proj(self.features(images))

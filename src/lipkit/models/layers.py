"""Transformer building blocks shared by the image and text towers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.models.config import ACTIVATIONS


def activation(x: torch.Tensor, name: str) -> torch.Tensor:
    """The activation ``name`` (one of :data:`ACTIVATIONS`) of ``x``."""
    if name == "quick_gelu":
        return x * torch.sigmoid(1.702 * x)
    return F.gelu(x, approximate="tanh" if name == "gelu_tanh" else "none")


def activation_backward(grad: torch.Tensor, x: torch.Tensor, name: str) -> torch.Tensor:
    """The gradient with respect to ``x`` of ``activation(x, name)``, given the gradient of its output."""
    if name == "quick_gelu":
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1 - s))
    return torch.ops.aten.gelu_backward(grad, x, approximate="tanh" if name == "gelu_tanh" else "none")


def needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd will record an op on ``tensors`` (so saving less for the backward pass pays)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _ActivationLinear(torch.autograd.Function):
    """``linear(activation(h))`` that keeps ``h`` for the backward pass, not the activation's output.

    The plain composition keeps both: ``h`` for the activation's gradient and ``activation(h)`` for the
    linear layer's weight gradient. Recomputing the activation (one elementwise pass) in the backward
    pass frees the larger of an MLP's saved tensors: 8 of the 36 bytes per token and channel that a plain
    bf16 block keeps (tests/models/test_lean_layers.py).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, name):
        ctx.save_for_backward(h, weight)
        ctx.name, ctx.has_bias = name, bias is not None
        return F.linear(activation(h, name), weight, bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        a = activation(h, ctx.name).flatten(0, -2)  # (N, hidden)
        g = grad.flatten(0, -2)  # (N, out)
        grad_weight = g.t().mm(a) if ctx.needs_input_grad[1] else None
        grad_bias = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        grad_h = activation_backward(grad.matmul(weight), h, ctx.name) if ctx.needs_input_grad[0] else None
        return grad_h, grad_weight, grad_bias, None


def activation_linear(h: torch.Tensor, linear: nn.Linear, name: str) -> torch.Tensor:
    """``linear(activation(h, name))``, recomputing the activation in the backward pass.

    Values and gradients equal the plain composition's; under autocast the weights take the autocast
    dtype, as ``nn.Linear`` would.
    """
    weight, bias = linear.weight, linear.bias
    if not needs_grad(h, weight, bias):
        return linear(activation(h, name))
    if torch.is_autocast_enabled(h.device.type):
        dtype = torch.get_autocast_dtype(h.device.type)
        h, weight = h.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return _ActivationLinear.apply(h, weight, bias, name)


class _Float32LayerNorm(torch.autograd.Function):
    """LayerNorm of a low-precision input computed in float32, keeping the input, not its float32 copy."""

    @staticmethod
    def forward(ctx, x, shape, weight, bias, eps):
        out, mean, rstd = torch.ops.aten.native_layer_norm(x.float(), shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.shape = shape
        return out.to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = [ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]]
        grad_x, grad_weight, grad_bias = torch.ops.aten.native_layer_norm_backward(
            grad.float(), x.float(), ctx.shape, mean, rstd, weight, bias, mask
        )
        return None if grad_x is None else grad_x.to(x.dtype), None, grad_weight, grad_bias, None


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back, so bf16/fp16 activations stay stable.

    For a bf16/fp16 input the backward pass keeps that input (and the per-token statistics) and
    upcasts it again, instead of keeping a float32 copy twice its size.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        if x.dtype in (torch.bfloat16, torch.float16) and needs_grad(x, weight, bias):
            with torch.autocast(x.device.type, enabled=False):
                return _Float32LayerNorm.apply(x, tuple(self.normalized_shape), weight, bias, self.eps)
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
        # Unbind along the (B, T, 3, H, hd) layout, then transpose each to (B, H, T, hd): the backward pass
        # stacks the three gradients straight into the qkv layout, with no extra copy of a permuted stack.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, T, 3, self.heads, C // self.heads).unbind(2))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None)
        return self.proj(out.transpose(1, 2).reshape(B, T, C))  # (B, T, C)

    def attend(self, x: torch.Tensor, xq: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of a few query tokens over all tokens, projecting only those queries.

        Equal to ``forward(x)`` at the query positions when ``xq`` holds those rows of ``x``; with ``x`` from
        another sequence it is cross-attention (CoCa's decoder reads the image tokens this way).

        Args:
            x: Tokens (B, T, C), the keys and values.
            xq: Query tokens (B, Q, C).
            mask: Boolean or additive mask broadcastable to (B, heads, Q, T), or ``None``.

        Returns:
            (B, Q, C).
        """
        k, v = self.keys_values(x)
        return self.attend_kv(xq, k, v, mask)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of tokens ``x`` (B, T, C): each (B, heads, T, C // heads)."""
        B, T, C = x.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        kv = F.linear(x, weight[C:], None if bias is None else bias[C:]).view(B, T, 2, self.heads, C // self.heads)
        k, v = (t.transpose(1, 2) for t in kv.unbind(2))
        return k, v

    def attend_kv(
        self, xq: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of query tokens ``xq`` (B, Q, C) over given keys and values (:meth:`keys_values`): (B, Q, C)."""
        B, Q, C = xq.shape
        weight, bias = self.qkv.weight, self.qkv.bias
        q = F.linear(xq, weight[:C], None if bias is None else bias[:C]).view(B, Q, self.heads, C // self.heads)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, Q, C))  # (B, Q, C)

    def step(self, h: torch.Tensor, cache: KVCache, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Causal self-attention of new tokens ``h`` (B, Q, C) over the cached ones and themselves.

        The new tokens' keys and values are appended to ``cache``; with ``Q == 1`` and no mask, the
        result equals ``forward(all tokens, causal=True)`` at the new position.

        Args:
            h: The new tokens (normalised, as the block feeds them).
            cache: Keys and values of the earlier tokens; updated in place.
            mask: Boolean mask broadcastable to (B, heads, Q, T_total), ``True`` where a key may be seen;
                ``None`` lets every new token see every cached one and, causally, the new ones.
        """
        B, Q, C = h.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(h).view(B, Q, 3, self.heads, C // self.heads).unbind(2))
        k, v = cache.append(k, v)
        if mask is None and Q > 1:  # new tokens see all cached ones, and the new ones causally
            T = k.shape[2]
            mask = torch.ones(Q, T, dtype=torch.bool, device=h.device).tril(T - Q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(B, Q, C))


class KVCache:
    """The keys and values of the tokens one attention layer has seen, for step-by-step decoding.

    Attributes:
        k: Keys (B, heads, T, head width), or ``None`` before the first step.
        v: Values, the same shape.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add new keys and values (B, heads, Q, hd) after the cached ones; returns all of them."""
        self.k = k if self.k is None else torch.cat([self.k, k], dim=2)
        self.v = v if self.v is None else torch.cat([self.v, v], dim=2)
        return self.k, self.v

    def select(self, rows: torch.Tensor) -> None:
        """Keep (and reorder, or repeat) the batch rows ``rows`` (beam search)."""
        if self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


class Mlp(nn.Module):
    """Two linear layers with an activation between them."""

    def __init__(
        self, width: int, hidden: int, act: str = "gelu", out: int | None = None, bias: tuple[bool, bool] = (True, True)
    ) -> None:
        super().__init__()
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {', '.join(ACTIVATIONS)}")
        self.fc1 = nn.Linear(width, hidden, bias=bias[0])
        self.act = act
        self.fc2 = nn.Linear(hidden, out or width, bias=bias[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The activation is recomputed in the backward pass rather than kept (see activation_linear).
        return activation_linear(self.fc1(x), self.fc2, self.act)


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

    def step(self, x: torch.Tensor, cache: KVCache, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output for new tokens ``x`` (B, Q, W) after the cached ones (see :meth:`Attention.step`)."""
        x = x + self.ls1(self.attn.step(self.norm1(x), cache, mask))
        return x + self.ls2(self.mlp(self.norm2(x)))

    def forward_at(self, x: torch.Tensor, index: int | torch.Tensor, causal: bool = False) -> torch.Tensor:
        """The block's output at one position per row, computing nothing for the other positions.

        Equal to ``self(x, causal)[rows, index]``: every token still serves as a key and value, but only the
        selected one is projected as a query and goes through the attention output and the MLP.

        Args:
            x: Tokens (B, T, W).
            index: The position, the same for every row (an int; negative counts from the end) or one per
                row (a (B,) integer tensor).
            causal: The selected token attends only to positions up to its own.

        Returns:
            (B, W).
        """
        B, T, _ = x.shape
        h = self.norm1(x)
        mask = None
        if isinstance(index, int):
            index = index % T
            x_q, h_q = x[:, index], h[:, index : index + 1]  # (B, W), (B, 1, W)
            if causal:
                h = h[:, : index + 1]  # the keys the query may see
        else:  # gather (its backward is a scatter-add) rather than advanced indexing (a sort and index_put)
            at = index.reshape(B, 1, 1).expand(B, 1, x.shape[2])
            x_q, h_q = x.gather(1, at)[:, 0], h.gather(1, at)  # (B, W), (B, 1, W)
            if causal:
                mask = (torch.arange(T, device=x.device) <= index.unsqueeze(1)).view(B, 1, 1, T)
        x_q = x_q + self.ls1(self.attn.attend(h, h_q, mask)[:, 0])
        return x_q + self.ls2(self.mlp(self.norm2(x_q)))


class Transformer(nn.Module):
    """A stack of pre-norm blocks, with optional activation checkpointing."""

    def __init__(self, width: int, layers: int, heads: int, **block_kwargs: object) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(width, heads, **block_kwargs) for _ in range(layers)])
        self.grad_checkpointing = False

    def forward(
        self,
        x: torch.Tensor,
        causal: bool = False,
        mask: torch.Tensor | None = None,
        start: int = 0,
        stop: int | None = None,
    ) -> torch.Tensor:
        """Run blocks ``start`` to ``stop`` (all by default) on ``x`` (B, T, W)."""
        for block in self.blocks[start:stop]:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, causal, mask, use_reentrant=False)
            else:
                x = block(x, causal=causal, mask=mask)
        return x

    def forward_pooled(
        self, x: torch.Tensor, index: int | torch.Tensor, causal: bool = False, start: int = 0
    ) -> torch.Tensor:
        """Run blocks ``start`` onwards and return only the token at ``index`` of each row: (B, W).

        Equal to ``self(x, causal, start=start)[rows, index]``, but the last block computes its output
        for the selected tokens only (see :meth:`Block.forward_at`), which skips most of that block's work
        when a tower pools a single token (class token, end-of-text token).
        """
        last = len(self.blocks) - 1
        if start > last:
            return x[:, index] if isinstance(index, int) else x[torch.arange(x.shape[0], device=x.device), index]
        x = self(x, causal=causal, start=start, stop=last)
        block = self.blocks[last]
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block.forward_at, x, index, causal, use_reentrant=False)
        return block.forward_at(x, index, causal)

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


class QueryPool(nn.Module):
    """Attention pooling with many learned queries (OpenCLIP's CoCa ``AttentionalPooler``).

    The normalised queries attend over the normalised tokens through ``nn.MultiheadAttention``; the tokens
    may be wider than the queries (``kv_width``). Each query attends on its own, so the first output does
    not depend on the other queries.

    Args:
        width: Width of the queries and outputs.
        kv_width: Width of the tokens pooled.
        queries: Number of learned queries.
        heads: Attention heads.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(self, width: int, kv_width: int, queries: int, heads: int, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(queries, width))
        self.attn = nn.MultiheadAttention(width, heads, kdim=kv_width, vdim=kv_width, batch_first=True)
        self.norm_q = LayerNorm(width, eps=norm_eps)
        self.norm_kv = LayerNorm(kv_width, eps=norm_eps)

    def forward(self, x: torch.Tensor, first_only: bool = False) -> torch.Tensor:
        """Pool tokens (B, T, kv_width) into (B, queries, width); only the first query's row if ``first_only``."""
        x = self.norm_kv(x)
        q = self.norm_q(self.query[:1] if first_only else self.query)
        return self.attn(q.unsqueeze(0).expand(x.shape[0], -1, -1), x, x, need_weights=False)[0]

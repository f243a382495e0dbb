"""Text towers: the CLIP text transformer and Hugging Face encoders from a local directory."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lipkit.errors import ConfigError, LipkitError
from lipkit.models.config import HFTextConfig, TextTransformerConfig
from lipkit.models.layers import LayerNorm, Mlp, Transformer
from lipkit.models.text_inputs import TextCache, TextTokens
from lipkit.utils import package_path


def pool_tokens(x: torch.Tensor, tokens: torch.Tensor, how: str, pad_id: int = 0, eos_id: int = 2) -> torch.Tensor:
    """Pool token features (B, T, W) into (B, W).

    Args:
        x: Token features.
        tokens: Token ids or attention mask (B, T), used by ``eot``, ``eos`` and ``mean``.
        how: ``eot`` (position of the largest id, CLIP's end-of-text), ``eos`` (first position holding
            ``eos_id``; the first position when none does), ``last``, ``first``/``cls``, ``mean`` (over
            positions whose id is not ``pad_id``).
        pad_id: Padding id for ``mean``.
        eos_id: End-of-text id for ``eos``.
    """
    if how in ("eot", "eos"):
        return x[torch.arange(x.shape[0], device=x.device), pool_index(tokens, how, eos_id)]
    if how == "last":
        return x[:, -1]
    if how in ("first", "cls"):
        return x[:, 0]
    keep = (tokens != pad_id).unsqueeze(-1).to(x.dtype)  # (B, T, 1)
    return (x * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1)


def pool_index(tokens: torch.Tensor, how: str, eos_id: int = 2) -> int | torch.Tensor | None:
    """The position :func:`pool_tokens` selects for ``how``: an int, a (B,) tensor (``eot``, ``eos``) or ``None``."""
    if how == "eot":
        return tokens.argmax(dim=-1)
    if how == "eos":
        return (tokens == eos_id).int().argmax(dim=-1)
    if how == "last":
        return -1
    if how in ("first", "cls"):
        return 0
    return None


class TextTransformer(nn.Module):
    """CLIP's text transformer: token + position embeddings, pre-norm blocks, final norm, pooling, projection.

    It takes token ids (B, T), as :class:`~lipkit.models.tokenizer.ClipTokenizer` returns them.

    Args:
        cfg: Architecture.
        embed_dim: Width of the shared embedding space.
    """

    def __init__(self, cfg: TextTransformerConfig, embed_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.context_length = cfg.context_length
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.width)
        # CoCa appends a class token after the text, at one more position
        self.cls_emb = nn.Parameter(torch.empty(cfg.width)) if cfg.embed_cls else None
        self.pos_embed = nn.Parameter(torch.empty(cfg.context_length + int(cfg.embed_cls), cfg.width))
        self.transformer = Transformer(
            cfg.width, cfg.layers, cfg.heads, mlp_ratio=cfg.mlp_ratio, act=cfg.act, norm_eps=cfg.norm_eps
        )
        self.norm = LayerNorm(cfg.width, eps=cfg.norm_eps)
        if not cfg.proj and cfg.width != embed_dim:
            raise ConfigError(f"text.proj is false but width {cfg.width} != embed_dim {embed_dim}")
        self.proj = nn.Linear(cfg.width, embed_dim, bias=cfg.proj_bias) if cfg.proj else nn.Identity()
        self.output_dim = embed_dim
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)
        if self.cls_emb is not None:
            nn.init.normal_(self.cls_emb, std=0.01)
        self.transformer.init_weights(cfg.width, cfg.layers)
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=cfg.width**-0.5)
            if self.proj.bias is not None:
                nn.init.zeros_(self.proj.bias)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        self.transformer.grad_checkpointing = enable

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Embed token ids (B, T) with T <= context_length into (B, embed_dim), not normalised."""
        return self.proj(self.features(tokens))

    def features(self, tokens: torch.Tensor) -> torch.Tensor:
        """The pooled feature before the projection head: (B, width)."""
        states = self.hidden(tokens, 0)
        return self.features_from_hidden(states.features, states.tokens, 0)

    def trunk_layers(self) -> nn.ModuleList:
        """The transformer blocks, bottom to top."""
        return self.transformer.blocks

    def top_modules(self) -> list[nn.Module]:
        """What follows the blocks before the projection head (the final norm)."""
        return [self.norm]

    def hidden(self, tokens: torch.Tensor, stop: int) -> TextCache:
        """Token states (B, T, W) after the embeddings and the first ``stop`` blocks, with the token ids."""
        if not isinstance(tokens, torch.Tensor):
            raise LipkitError(f"the CLIP text transformer takes token ids (B, T), got {type(tokens).__name__}")
        T = tokens.shape[1]
        if self.context_length < T:
            raise LipkitError(f"text has {T} tokens but the model's context_length is {self.context_length}")
        x = self.token_embed(tokens)  # (B, T, W)
        if self.cls_emb is not None:  # (B, T + 1, W): the class token after the text
            x = torch.cat([x, self.cls_emb.to(x.dtype).expand(x.shape[0], 1, -1)], dim=1)
        x = x + self.pos_embed[: x.shape[1]].to(x.dtype)
        return TextCache(self.transformer(x, causal=self.cfg.causal, mask=self.cls_mask(tokens), stop=stop), tokens)

    def cls_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """With ``embed_cls``, the attention mask (B, 1, T + 1, T + 1), ``True`` where a query may see a key:
        causal if the tower is, and never a padding key (as OpenCLIP's CoCa sees it: see
        :attr:`~lipkit.models.config.TextTransformerConfig.correct_cls_mask`); ``None`` without it."""
        if self.cls_emb is None:
            return None
        valid = self.key_valid(tokens)  # (B, T + 1)
        n = valid.shape[1]
        mask = valid[:, None, None, :]
        if self.cfg.causal:
            mask = mask & torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril()
        return mask

    def key_valid(self, tokens: torch.Tensor) -> torch.Tensor:
        """Which of the T + 1 positions (text, then the class token) an ``embed_cls`` tower lets queries see."""
        valid = tokens != self.cfg.pad_id
        ones = valid.new_ones(valid.shape[0], 1)
        return torch.cat([valid, ones] if self.cfg.correct_cls_mask else [ones, valid], dim=1)

    def pooled_and_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled feature before the projection head (B, width) and the token states a captioning
        decoder reads (B, T, width): before the final norm, without the class token, with ``embed_cls``
        (CoCa); after it otherwise."""
        states = self.hidden(tokens, len(self.transformer.blocks))
        if self.cls_emb is not None:
            return self.norm(states.features[:, -1]), states.features[:, :-1]
        x = self.norm(states.features)
        return pool_tokens(x, tokens, self.cfg.pool, self.cfg.pad_id), x

    def features_from_hidden(self, x: torch.Tensor, tokens: torch.Tensor, start: int) -> torch.Tensor:
        """The pooled feature from token states ``x`` that went through the first ``start`` blocks."""
        if self.cls_emb is not None:  # the appended class token, normalised alone
            x = self.transformer(x, causal=self.cfg.causal, mask=self.cls_mask(tokens), start=start)
            return self.norm(x[:, -1])
        index = pool_index(tokens, self.cfg.pool, self.cfg.eos_id)
        if index is not None:  # one token per text: the last block computes only that one, then the norm
            return self.norm(self.transformer.forward_pooled(x, index, causal=self.cfg.causal, start=start))
        x = self.norm(self.transformer(x, causal=self.cfg.causal, start=start))
        return pool_tokens(x, tokens, self.cfg.pool, self.cfg.pad_id)

    def trim(self, states: TextCache) -> TextCache:
        """Drop trailing positions that cannot change any pooled feature (only exact with causal attention)."""
        if not self.cfg.causal or self.cls_emb is not None:  # the class token pools after the padding
            return states
        tokens = states.tokens
        used = tokens != self.cfg.pad_id
        index = pool_index(tokens, self.cfg.pool, self.cfg.eos_id)
        if isinstance(index, torch.Tensor):  # the end-of-text token pools, even where it is the padding id
            used[torch.arange(tokens.shape[0]), index] = True
        keep = int(used.nonzero()[:, 1].max()) + 1 if used.any() else 1
        return TextCache(states.features[:, :keep], tokens[:, :keep])


def resolve_local_path(path: str) -> Path:
    """Resolve ``pkg:PACKAGE/sub/path`` to a file or folder inside an installed package; other paths as given.

    Raises:
        LipkitError: The package is not installed, or holds nothing at ``sub/path``.
    """
    if path.startswith("pkg:"):
        package, _, sub = path[4:].partition("/")
        return package_path(package, sub)
    return Path(os.path.expanduser(path))


def make_head(
    in_dim: int,
    out_dim: int,
    kind: str,
    bias: bool = False,
    hidden: int | None = None,
    mlp_bias: tuple[bool, bool] = (True, True),
) -> nn.Module:
    """A projection head: ``linear``, ``mlp`` (in -> hidden -> out with GELU) or ``none`` (identity).

    ``bias`` is the linear head's; ``hidden`` is the MLP's hidden width (by default the mean of ``in_dim``
    and ``out_dim``) and ``mlp_bias`` whether each of its two layers has a bias.
    """
    if kind == "none":
        if in_dim != out_dim:
            raise ConfigError(f"projection 'none' needs feature width {in_dim} == embed_dim {out_dim}")
        return nn.Identity()
    if kind == "mlp":
        return Mlp(in_dim, hidden or (in_dim + out_dim) // 2, "gelu", out=out_dim, bias=tuple(mlp_bias))
    return nn.Linear(in_dim, out_dim, bias=bias)


class HFTextEncoder(nn.Module):
    """A Hugging Face ``AutoModel`` text encoder, pooled and projected into the shared space.

    It takes :class:`TextTokens`, the ids with their attention mask, as the matching
    :class:`~lipkit.models.hf_tokenizer.HFTokenizer` returns them.
    """

    def __init__(self, cfg: HFTextConfig, embed_dim: int) -> None:
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError:
            raise LipkitError("Hugging Face text towers need `pip install 'lipkit[towers]'`") from None
        self.cfg = cfg
        self.context_length = cfg.context_length
        path = resolve_local_path(cfg.path)
        if not (path / "config.json").is_file():
            raise LipkitError(f"no Hugging Face model (config.json) in {path}")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        config = _hf_config(path, cfg.config_overrides)
        if cfg.from_config or torch.empty(0).device.type == "meta":  # no weights, or building on the meta device
            self.encoder = _encoder_from_config(config)
        else:
            model = AutoModel.from_pretrained(str(path), config=config, local_files_only=True)
            self.encoder = model.get_encoder() if getattr(config, "is_encoder_decoder", False) else model
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        width = self.encoder.config.hidden_size
        self.proj = make_head(width, embed_dim, cfg.proj, cfg.proj_bias, mlp_bias=cfg.mlp_bias)
        self.output_dim = embed_dim

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory."""
        if enable:
            self.encoder.gradient_checkpointing_enable()
        elif getattr(self.encoder, "is_gradient_checkpointing", False):
            self.encoder.gradient_checkpointing_disable()

    def forward(self, tokens: TextTokens | torch.Tensor) -> torch.Tensor:
        """Embed tokenised text into (B, embed_dim), not normalised."""
        return self.proj(self.features(tokens))

    def features(self, tokens: TextTokens | torch.Tensor) -> torch.Tensor:
        """The pooled encoder output before the projection head: (B, hidden_size).

        ``tokens`` are the ids with their attention mask, or the ids alone (B, T), whose mask is then every
        position that is not the model's padding id, as OpenCLIP reads them.
        """
        return self.pooled_and_tokens(tokens)[0]

    def pooled_and_tokens(self, tokens: TextTokens | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pooled feature (B, hidden_size) and the token states a captioning decoder reads (B, T', hidden_size):
        the encoder's output, without the first token when it pools (OpenCLIP's CoCa reads them so)."""
        if isinstance(tokens, torch.Tensor) and tokens.ndim == 2 and tokens.dtype == torch.long:
            tokens = TextTokens(tokens, (tokens != self.pad_id).long())
        _check_tokens(tokens)
        hidden = self.encoder(input_ids=tokens.ids, attention_mask=tokens.mask).last_hidden_state
        return self._pool(hidden, tokens.mask), hidden[:, 1:] if self.cfg.pool == "cls" else hidden

    def _pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.cfg.pool == "eot":
            return x[torch.arange(x.shape[0], device=x.device), mask.sum(dim=1) - 1]
        return pool_tokens(x, mask, "cls" if self.cfg.pool == "cls" else "mean", pad_id=0)

    def trunk_layers(self) -> nn.ModuleList:
        """The encoder's transformer layers, bottom to top (BERT-style encoders: ``encoder.layer``)."""
        layers = getattr(getattr(self.encoder, "encoder", None), "layer", None)
        if not isinstance(layers, nn.ModuleList):
            raise ConfigError(
                f"unlocking or caching text layers needs a BERT-style encoder (encoder.layer); "
                f"{type(self.encoder).__name__} has none"
            )
        return layers

    def top_modules(self) -> list[nn.Module]:
        """What follows the layers before the projection head (nothing: pooling has no weights)."""
        return []

    def _layer_mask(self, mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor | None:
        """The attention mask in the form the encoder's layers take."""
        try:
            from transformers.masking_utils import create_bidirectional_mask
        except ImportError:  # transformers 4.x
            return self.encoder.get_extended_attention_mask(mask, tuple(mask.shape))
        return create_bidirectional_mask(config=self.encoder.config, inputs_embeds=x, attention_mask=mask)

    def _run_layers(self, x: torch.Tensor, mask: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
        layer_mask = self._layer_mask(mask, x)
        for layer in self.trunk_layers()[start:stop]:
            out = layer(x, attention_mask=layer_mask)
            x = out[0] if isinstance(out, tuple) else out
        return x

    def hidden(self, tokens: TextTokens, stop: int) -> TextCache:
        """Token states (B, T, W) after the embeddings and the first ``stop`` layers, with the attention mask."""
        _check_tokens(tokens)
        x = self.encoder.embeddings(input_ids=tokens.ids)
        return TextCache(self._run_layers(x, tokens.mask, 0, stop), tokens.mask)

    def features_from_hidden(self, x: torch.Tensor, mask: torch.Tensor, start: int) -> torch.Tensor:
        """The pooled feature from token states ``x`` that went through the first ``start`` layers."""
        return self._pool(self._run_layers(x, mask, start, None), mask)

    def trim(self, states: TextCache) -> TextCache:
        """Drop trailing positions that are padding in every row (masked, so the result is unchanged)."""
        keep = max(int(states.tokens.sum(dim=1).max()), 1)
        return TextCache(states.features[:, :keep], states.tokens[:, :keep])


def _hf_config(path: Path, overrides: dict[str, Any]) -> Any:
    """The Hugging Face config in ``path``, with ``overrides`` set (each must be a setting it has)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"text.config_overrides: {config.model_type} has no setting {key!r}")
        setattr(config, key, value)
    return config


def _encoder_from_config(config: Any) -> nn.Module:
    """A freshly initialised encoder: the model itself, or an encoder-decoder's encoder alone.

    The encoder of an encoder-decoder model (mT5, NLLB) is built on its own, not cut from the whole
    model, so its decoder never takes memory; its class is read off the whole model built on the meta device.
    """
    from transformers import AutoModel

    if not getattr(config, "is_encoder_decoder", False):
        try:  # OpenCLIP builds BERT-style towers without their pooling layer unless it pools with it
            return AutoModel.from_config(config, add_pooling_layer=False)
        except TypeError:
            return AutoModel.from_config(config)
    with torch.device("meta"):
        encoder_class = type(AutoModel.from_config(config).get_encoder())
    encoder_config = copy.deepcopy(config)
    encoder_config.is_decoder, encoder_config.use_cache, encoder_config.is_encoder_decoder = False, False, False
    return encoder_class(encoder_config)


def _check_tokens(tokens: object) -> None:
    if not isinstance(tokens, TextTokens):
        raise LipkitError(
            f"a Hugging Face text tower takes TextTokens (ids and attention mask, as its tokenizer returns) or "
            f"a (batch, length) tensor of token ids, got {_describe(tokens)}"
        )


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return type(value).__name__

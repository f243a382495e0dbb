"""The dual encoder: an image tower and a text tower mapped into one embedding space."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import ConfigError
from lipkit.models.config import ModelConfig
from lipkit.models.image_inputs import MixedImages, trunk_features
from lipkit.models.text_inputs import TextCache, Tokens
from lipkit.models.towers import build_tower


@dataclass
class DualEncoderOutput:
    """What :meth:`DualEncoder.forward` returns, always.

    Attributes:
        image_features: L2-normalised image embeddings (B, D).
        text_features: L2-normalised text embeddings (B, D).
        logit_scale: The temperature as a multiplier, ``exp`` of the learned log scale, clamped (scalar).
        logit_bias: The learned logit bias (scalar), or ``None`` for models without one.
    """

    image_features: torch.Tensor
    text_features: torch.Tensor
    logit_scale: torch.Tensor
    logit_bias: torch.Tensor | None


class DualEncoder(nn.Module):
    """A CLIP/SigLIP-style dual encoder built from a :class:`ModelConfig`.

    Each tower's output layer is named ``proj``; locking a tower (LiT) freezes everything else in it
    and keeps it in eval mode.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        vision_cfg, text_cfg = cfg.vision_config(), cfg.text_config()
        self.visual = build_tower(vision_cfg, cfg.embed_dim)
        self.text = build_tower(text_cfg, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        bias = cfg.init_logit_bias
        self.logit_bias = nn.Parameter(torch.tensor(float(bias))) if bias is not None else None
        self.context_length = self.text.context_length
        self.register_buffer("bridge_head", None)  # class bridge: the classifier rows (C, F)
        self.register_buffer("bridge_text", None)  # and the class names' unit text embeddings (C, D)
        self._bridge_states: tuple[list[TextCache], torch.Tensor] | None = None  # the class names' cached text states
        if cfg.class_bridge:
            if not hasattr(self.visual, "classifier_head"):
                raise ConfigError(
                    f"class_bridge needs an image tower that ships its classifier (a pretrained timm tower), "
                    f"not {type(self.visual).__name__}"
                )
            head = self.visual.classifier_head()
            self.register_buffer("bridge_head", head.detach().clone().float())
            # the class names' text embeddings; zero (no effect) until :meth:`refresh_bridge` runs
            self.register_buffer("bridge_text", torch.zeros(head.shape[0], cfg.embed_dim))
            self.bridge_weight = nn.Parameter(torch.tensor(float(cfg.class_bridge_weight)))
        if cfg.lock_image:
            _lock(self.visual)
        if cfg.lock_text:
            _lock(self.text)
            for module in self.unlocked_text_modules():
                module.requires_grad_(True)

    def unlocked_text_modules(self) -> list[nn.Module]:
        """The top text layers (and the norm after them) that ``unlock_text_layers`` keeps trainable."""
        n = self.cfg.unlock_text_layers
        if not n:
            return []
        layers = self.text.trunk_layers()
        if n > len(layers):
            raise ConfigError(f"unlock_text_layers={n} but the text tower has {len(layers)} layers")
        return [*layers[len(layers) - n :], *self.text.top_modules()]

    def text_cache_layer(self) -> int | None:
        """Where cached text states stop: the first unlocked text layer, or ``None`` (pooled features)."""
        n = self.cfg.unlock_text_layers
        return len(self.text.trunk_layers()) - n if n else None

    def locked_towers(self) -> list[nn.Module]:
        """The towers whose trunks are frozen."""
        return [t for t, lock in ((self.visual, self.cfg.lock_image), (self.text, self.cfg.lock_text)) if lock]

    def train(self, mode: bool = True) -> DualEncoder:
        """Set training mode; locked tower trunks stay in eval mode (frozen BatchNorm statistics)."""
        super().train(mode)
        for tower in self.locked_towers():
            for name, module in tower.named_children():
                if name != "proj":
                    module.eval()
        for module in self.unlocked_text_modules():
            module.train(mode)
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing on or off in both towers."""
        self.visual.set_grad_checkpointing(enable)
        self.text.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor | MixedImages, normalize: bool = False) -> torch.Tensor:
        """Embed images (B, 3, H, W) into (B, D); L2-normalised if ``normalize``.

        ``images`` may be a :class:`~lipkit.models.image_inputs.MixedImages` batch, some of whose rows
        are given as trunk features (classifier prototypes): the trunk runs on the other rows only.
        """
        if isinstance(images, MixedImages):
            features = trunk_features(self.visual.features, images)
        elif self.bridge_text is not None:
            features = self.visual.features(images)
        else:
            x = self.visual(images)
            return F.normalize(x, dim=-1) if normalize else x
        x = self.bridge(features, self.visual.proj(features))
        return F.normalize(x, dim=-1) if normalize else x

    def bridge(self, features: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The image head's output ``x`` (B, D) plus the class bridge (``class_bridge``), if the model has one.

        The frozen tower's classifier reads the trunk ``features`` (B, F); its softmax over the classes
        (temperature ``class_bridge_temperature``) weights the class names' unit text embeddings
        (:attr:`bridge_text`); the sum, scaled by ``|x|`` and the learned weight, is added to ``x``.
        """
        if self.bridge_text is None or self.bridge_head is None:
            return x
        logits = features.float() @ self.bridge_head.T / self.cfg.class_bridge_temperature
        names = logits.softmax(dim=-1) @ self.bridge_text
        return x + (self.bridge_weight * x.float().norm(dim=-1, keepdim=True) * names).to(x.dtype)

    @torch.no_grad()
    def refresh_bridge(self, chunks: Sequence[Tokens], classes: torch.Tensor) -> None:
        """Recompute :attr:`bridge_text`, the class names' text embeddings, from the current text tower.

        Each class's embedding is the normalised mean of its captions' unit embeddings. With a locked
        (or partly unlocked) text tower, the locked layers' output for the captions is computed once and
        kept: a refresh then runs only the trainable top.

        Args:
            chunks: The tokenised captions of every class name (``"a photo of a {name}."``), in batches
                (captions of similar length together keep the padding short).
            classes: The class (classifier row) of each caption, in the batches' order (N,).
        """
        if self.bridge_text is None:
            raise ConfigError("refresh_bridge: the model has no class bridge (class_bridge is empty)")
        was_training = self.training
        self.eval()
        try:
            if not self.cfg.lock_text:
                emb = torch.cat([self.encode_text(tokens, normalize=True) for tokens in chunks])
            else:
                if self._bridge_states is None or self._bridge_states[1] is not classes:
                    self._bridge_states = ([self._locked_text(tokens) for tokens in chunks], classes)
                finish = self.text_from_cache
                emb = torch.cat([F.normalize(self.text.proj(finish(s)), dim=-1) for s in self._bridge_states[0]])
        finally:
            self.train(was_training)
        classes = classes.to(emb.device)
        total = torch.zeros_like(self.bridge_text).index_add_(0, classes, emb.float())
        self.bridge_text.copy_(F.normalize(total, dim=-1))

    def _locked_text(self, tokens: Tokens) -> TextCache:
        """The locked text layers' output for ``tokens``, where :meth:`text_from_cache` starts."""
        layer = self.text_cache_layer()
        return (
            TextCache(self.text.features(tokens)) if layer is None else self.text.trim(self.text.hidden(tokens, layer))
        )

    def encode_text(self, tokens: Tokens, normalize: bool = False) -> torch.Tensor:
        """Embed tokenised text into (B, D); L2-normalised if ``normalize``.

        Args:
            tokens: What the model's tokenizer (:func:`lipkit.get_tokenizer`) returns: token ids (B, T)
                for the CLIP text transformer, :class:`~lipkit.models.text_inputs.TextTokens` for
                Hugging Face text towers.
            normalize: L2-normalise the embeddings.
        """
        x = self.text(tokens)
        return F.normalize(x, dim=-1) if normalize else x

    def scale(self) -> torch.Tensor:
        """The logit scale as a multiplier: ``exp(log_scale)`` clamped at ``cfg.max_logit_scale``."""
        return self.logit_scale.clamp(max=math.log(self.cfg.max_logit_scale)).exp()

    def text_from_cache(self, text: TextCache) -> torch.Tensor:
        """The text trunk's pooled features (B, F) from its cached output, through any unlocked top layers."""
        if text.tokens is None:
            return text.features
        return self.text.features_from_hidden(text.features, text.tokens, self.text_cache_layer())

    def forward_from_features(self, image_features: torch.Tensor, text: TextCache) -> DualEncoderOutput:
        """Like :meth:`forward`, from cached frozen-trunk outputs.

        Args:
            image_features: The image trunk's pooled features (B, F), before the projection head.
            text: The text trunk's cached output: pooled features or, with ``unlock_text_layers``, the
                token states entering the first unlocked layer (:meth:`text_cache_layer`).
        """
        image = self.bridge(image_features, self.visual.proj(image_features))
        return DualEncoderOutput(
            image_features=F.normalize(image, dim=-1),
            text_features=F.normalize(self.text.proj(self.text_from_cache(text)), dim=-1),
            logit_scale=self.scale(),
            logit_bias=self.logit_bias,
        )

    def forward(self, images: torch.Tensor | MixedImages, tokens: Tokens) -> DualEncoderOutput:
        """Embed a batch of paired images and texts (``tokens`` as :meth:`encode_text` takes them)."""
        return DualEncoderOutput(
            image_features=self.encode_image(images, normalize=True),
            text_features=self.encode_text(tokens, normalize=True),
            logit_scale=self.scale(),
            logit_bias=self.logit_bias,
        )


def _lock(tower: nn.Module) -> None:
    for name, param in tower.named_parameters():
        if not name.startswith("proj."):
            param.requires_grad_(False)

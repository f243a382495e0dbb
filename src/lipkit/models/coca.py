"""CoCa: a dual encoder with a captioning decoder (contrastive captioners, Yu et al. 2022).

The image tower gives a pooled embedding and image tokens; the text tower gives a pooled embedding and
its token states. A multimodal decoder reads the token states causally, attending to the image tokens,
and predicts each next token: the captioning loss trains it, and :meth:`CoCa.generate` writes captions
(greedy, top-k or nucleus sampling, beam search). The architecture and key layout follow OpenCLIP's
``CoCa``, so its checkpoints load (:mod:`lipkit.models.convert`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import ConfigError, LipkitError
from lipkit.models.clip import DualEncoder, DualEncoderOutput
from lipkit.models.config import DecoderConfig, ModelConfig
from lipkit.models.image_inputs import MixedImages
from lipkit.models.layers import Attention, Block, KVCache, LayerNorm, LayerScale, Mlp
from lipkit.models.text_inputs import TextTokens, Tokens

GENERATION_METHODS = ("beam", "greedy", "top_k", "top_p")
CLIP_SOT_ID, CLIP_EOT_ID = 49406, 49407  # CLIP's start- and end-of-text ids, the defaults OpenCLIP's CoCa uses


@dataclass
class CoCaOutput(DualEncoderOutput):
    """What :meth:`CoCa.forward` returns: the dual encoder's output plus next-token predictions.

    Attributes:
        logits: The decoder's next-token logits (B, T - 1, vocab) for positions 0 .. T - 2.
        labels: The tokens they predict, ids 1 .. T - 1 (B, T - 1).
        pad_id: The padding id, which the captioning loss ignores.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    pad_id: int


class CrossBlock(nn.Module):
    """A pre-norm cross-attention block: text tokens attend to (normalised) image tokens, then an MLP."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        width, init = cfg.width, cfg.layer_scale_init
        self.norm1 = LayerNorm(width, eps=cfg.norm_eps)
        self.norm_kv = LayerNorm(width, eps=cfg.norm_eps)
        self.attn = Attention(width, cfg.heads)
        self.ls1 = LayerScale(width, init) if init is not None else nn.Identity()
        self.norm2 = LayerNorm(width, eps=cfg.norm_eps)
        self.mlp = Mlp(width, int(width * cfg.mlp_ratio), cfg.act)
        self.ls2 = LayerScale(width, init) if init is not None else nn.Identity()

    def keys_values(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the image tokens (B, N, W), computed once per caption."""
        return self.attn.keys_values(self.norm_kv(image))

    def forward(self, x: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        return self.attend(x, *self.keys_values(image))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The block's output for text tokens ``x`` (B, T, W) given the image keys and values."""
        x = x + self.ls1(self.attn.attend_kv(self.norm1(x), k, v))
        return x + self.ls2(self.mlp(self.norm2(x)))


class MultimodalDecoder(nn.Module):
    """CoCa's decoder: per layer, a causal self-attention block and a cross-attention block; then a norm
    and a linear head onto the vocabulary (no positional embedding: the text tower's states carry them)."""

    def __init__(self, cfg: DecoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        block = {"mlp_ratio": cfg.mlp_ratio, "act": cfg.act, "norm_eps": cfg.norm_eps}
        self.blocks = nn.ModuleList(
            [Block(cfg.width, cfg.heads, layer_scale_init=cfg.layer_scale_init, **block) for _ in range(cfg.layers)]
        )
        self.cross = nn.ModuleList([CrossBlock(cfg) for _ in range(cfg.layers)])
        self.norm = LayerNorm(cfg.width, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)
        self.grad_checkpointing = False
        self._init_weights()

    def _init_weights(self) -> None:
        width, layers = self.cfg.width, self.cfg.layers
        proj_std, attn_std, fc_std = width**-0.5 * (2 * layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
        for block in [*self.blocks, *self.cross]:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=fc_std)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
            for linear in (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
                nn.init.zeros_(linear.bias)
        nn.init.normal_(self.head.weight, std=width**-0.5)

    def forward(self, image_tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Next-token logits (B, T, vocab) for text token states (B, T, W) given image tokens (B, N, W)."""
        checkpoint = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        for block, cross in zip(self.blocks, self.cross, strict=True):
            if checkpoint:
                text = torch.utils.checkpoint.checkpoint(block, text, True, use_reentrant=False)
                text = torch.utils.checkpoint.checkpoint(cross, text, image_tokens, use_reentrant=False)
            else:
                text = cross(block(text, causal=True), image_tokens)
        return self.head(self.norm(text))


class CoCa(DualEncoder):
    """A dual encoder with CoCa's captioning decoder (``ModelConfig.decoder``).

    ``forward`` returns a :class:`CoCaOutput` for the ``coca`` loss; ``encode_image``/``encode_text`` and
    everything built on them (zero-shot, retrieval, search) work as for any dual encoder.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
        dec = cfg.decoder_config()
        if dec is None:
            raise ConfigError("a CoCa model needs a decoder config (ModelConfig.decoder)")
        if not hasattr(self.visual, "pooled_and_tokens") or not hasattr(self.text, "pooled_and_tokens"):
            raise ConfigError("CoCa needs towers that give tokens: a vit image tower, a transformer or hf text tower")
        self.decoder = MultimodalDecoder(dec)
        vision = cfg.vision_config()
        image_width = cfg.embed_dim if vision.pool == "queries" else vision.width
        text_width = getattr(cfg.text_config(), "width", None) or self.text.encoder.config.hidden_size
        for what, width in (("image token", image_width), ("text", text_width)):
            if width != dec.width:
                raise ConfigError(f"decoder.width {dec.width} must equal the {what} width {width}")
        self.pad_id = int(getattr(self.text, "pad_id", getattr(cfg.text_config(), "pad_id", 0)))
        self.cached_decoding = bool(getattr(cfg.text_config(), "causal", False))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Turn activation checkpointing on or off in both towers and the decoder."""
        super().set_grad_checkpointing(enable)
        self.decoder.grad_checkpointing = enable

    def encode_image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image embeddings (B, D), not normalised, and the image tokens the decoder reads (B, N, W)."""
        if isinstance(images, MixedImages):
            raise LipkitError("CoCa's decoder reads image tokens: classifier prototypes cannot train a CoCa model")
        pooled, tokens = self.visual.pooled_and_tokens(images)
        return self.visual.proj(pooled), tokens

    def encode_text_tokens(self, tokens: Tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """The text embeddings (B, D), not normalised, and the token states the decoder reads (B, T, W)."""
        pooled, states = self.text.pooled_and_tokens(tokens)
        return self.text.proj(pooled), states

    def forward(self, images: torch.Tensor, tokens: Tokens) -> CoCaOutput:
        """Embed paired images and texts, and predict each text's next tokens from its image."""
        image_latent, image_tokens = self.encode_image_tokens(images)
        text_latent, states = self.encode_text_tokens(tokens)
        ids = tokens.ids if isinstance(tokens, TextTokens) else tokens
        return CoCaOutput(
            image_features=F.normalize(image_latent, dim=-1),
            text_features=F.normalize(text_latent, dim=-1),
            logit_scale=self.scale(),
            logit_bias=self.logit_bias,
            logits=self.decoder(image_tokens, states[:, :-1]),
            labels=ids[:, 1:],
            pad_id=self.pad_id,
        )

    @torch.no_grad()
    def generate(
        self,
        images: torch.Tensor,
        method: str = "beam",
        max_length: int = 30,
        min_length: int = 5,
        num_beams: int = 6,
        top_k: int = 50,
        top_p: float = 0.9,
        temperature: float = 1.0,
        repetition_penalty: float = 1.0,
        length_penalty: float = 1.0,
        sot_id: int = CLIP_SOT_ID,
        eos_id: int = CLIP_EOT_ID,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Write a caption for each image: token ids (B, L), starting with ``sot_id``, padded with the pad id.

        Args:
            images: Preprocessed images (B, 3, H, W).
            method: ``beam`` (beam search), ``greedy``, ``top_k`` or ``top_p`` (nucleus) sampling.
            max_length: Longest caption in tokens, the start token included; a sampled caption that
                reaches it ends with ``eos_id``.
            min_length: The end token is not chosen before the caption has this many tokens.
            num_beams: Beams per image (``beam``).
            top_k: Sample among the k most probable tokens (``top_k``).
            top_p: Sample among the most probable tokens whose probabilities add up to ``top_p`` (``top_p``).
            temperature: Divides the logits before sampling.
            repetition_penalty: Divides the positive logits (multiplies the negative ones) of tokens
                already in the caption; 1 leaves them.
            length_penalty: Beam scores are log-probabilities divided by length ** length_penalty.
            sot_id: The start token (CLIP's by default; the tokenizer's, see :func:`special_ids`).
            eos_id: The end token.
            generator: Random numbers for sampling.

        Returns:
            Token ids on the images' device.

        Raises:
            LipkitError: An unknown ``method`` or settings that cannot generate.
        """
        if method not in GENERATION_METHODS:
            raise LipkitError(f"unknown generation method {method!r}; choose one of {', '.join(GENERATION_METHODS)}")
        if not 1 <= min_length < max_length:
            raise LipkitError(f"need 1 <= min_length < max_length, got {min_length} and {max_length}")
        vocab = self.decoder.cfg.vocab_size
        if not (0 <= sot_id < vocab and 0 <= eos_id < vocab):
            raise LipkitError(f"sot_id {sot_id} and eos_id {eos_id} must be token ids below the vocabulary ({vocab})")
        was_training = self.training
        self.eval()
        try:
            _, image_tokens = self.encode_image_tokens(images)
            rules = _Rules(min_length, repetition_penalty, eos_id)
            if method == "beam":
                if num_beams < 1:
                    raise LipkitError(f"num_beams must be >= 1, got {num_beams}")
                return self._beam_search(image_tokens, rules, max_length, num_beams, length_penalty, sot_id, eos_id)
            pick = _picker(method, top_k, top_p, temperature, generator)
            return self._sample(image_tokens, rules, pick, max_length, sot_id, eos_id)
        finally:
            self.train(was_training)

    def _decoding(self, image_tokens: torch.Tensor) -> _Decoding:
        return _CachedDecoding(self, image_tokens) if self.cached_decoding else _FullDecoding(self, image_tokens)

    def _sample(
        self,
        image_tokens: torch.Tensor,
        rules: _Rules,
        pick: Callable[[torch.Tensor], torch.Tensor],
        max_length: int,
        sot_id: int,
        eos_id: int,
    ) -> torch.Tensor:
        """Greedy or sampled decoding, one token per step, as OpenCLIP's CoCa decodes."""
        B = image_tokens.shape[0]
        out = torch.full((B, 1), sot_id, dtype=torch.long, device=image_tokens.device)
        decoding = self._decoding(image_tokens)
        while True:
            done = (out[:, -1] == eos_id) | (out[:, -1] == self.pad_id)
            if bool(done.all()):
                break
            logits = rules(decoding.next_logits(out).float(), out)
            token = pick(logits)  # (B,)
            if out.shape[1] + 1 == max_length:
                token = torch.full_like(token, eos_id)
            token = torch.where(done, torch.full_like(token, self.pad_id), token)
            out = torch.cat([out, token[:, None]], dim=1)
            if out.shape[1] >= max_length:
                break
        return out

    def _beam_search(
        self,
        image_tokens: torch.Tensor,
        rules: _Rules,
        max_length: int,
        num_beams: int,
        length_penalty: float,
        sot_id: int,
        eos_id: int,
    ) -> torch.Tensor:
        """Beam search: the best caption by total log-probability over length ** ``length_penalty``."""
        B, K, device = image_tokens.shape[0], num_beams, image_tokens.device
        decoding = self._decoding(image_tokens.repeat_interleave(K, dim=0))
        out = torch.full((B * K, 1), sot_id, dtype=torch.long, device=device)
        scores = torch.full((B, K), float("-inf"), device=device)
        scores[:, 0] = 0.0  # the beams start equal: expand only the first
        finished: list[list[tuple[float, torch.Tensor]]] = [[] for _ in range(B)]
        done = [False] * B
        norm = lambda total, length: total / length**length_penalty  # noqa: E731
        while True:
            logp = F.log_softmax(rules(decoding.next_logits(out).float(), out), dim=-1)  # (B*K, V)
            vocab = logp.shape[1]
            candidates = (scores.view(-1, 1) + logp).view(B, K * vocab)
            top, index = candidates.topk(2 * K, dim=1)  # (B, 2K)
            rows, tokens, new_scores = [], [], []
            length = out.shape[1]  # tokens generated once this step's token is added (the start token not counted)
            for b in range(B):
                kept: list[tuple[int, int, float]] = []
                if not done[b]:
                    for rank, (score, flat) in enumerate(zip(top[b].tolist(), index[b].tolist(), strict=True)):
                        beam, token = divmod(flat, vocab)
                        if score == float("-inf"):
                            break
                        if token == eos_id:
                            if rank < K:  # an end among the best K candidates completes a caption
                                seq = torch.cat([out[b * K + beam], out.new_tensor([eos_id])])
                                _keep_best(finished[b], (norm(score, length), seq), K)
                            continue
                        kept.append((beam, token, score))
                        if len(kept) == K:
                            break
                    best_live = norm(kept[0][2], length) if kept else float("-inf")
                    done[b] = not kept or (len(finished[b]) >= K and best_live <= finished[b][-1][0])
                if done[b] or len(kept) < K:  # finished images keep stale rows, never read again
                    kept += [(0, self.pad_id, float("-inf"))] * (K - len(kept))
                for beam, token, score in kept:
                    rows.append(b * K + beam)
                    tokens.append(token)
                    new_scores.append(score)
            select = torch.tensor(rows, device=device)
            decoding.select(select)
            out = torch.cat([out[select], torch.tensor(tokens, device=device)[:, None]], dim=1)
            scores = torch.tensor(new_scores, device=device).view(B, K)
            if all(done) or out.shape[1] >= max_length:
                break
        for b in range(B):  # captions still open at the length limit compete as they are
            if not done[b]:
                for k in range(K):
                    if scores[b, k] > float("-inf"):
                        _keep_best(finished[b], (norm(float(scores[b, k]), out.shape[1] - 1), out[b * K + k]), K)
        best = [hyps[0][1] for hyps in finished]
        return nn.utils.rnn.pad_sequence(best, batch_first=True, padding_value=self.pad_id)


def _keep_best(hyps: list[tuple[float, torch.Tensor]], hyp: tuple[float, torch.Tensor], size: int) -> None:
    """Add ``hyp`` to ``hyps`` (kept sorted, best first) and keep the ``size`` best."""
    hyps.append(hyp)
    hyps.sort(key=lambda h: -h[0])
    del hyps[size:]


class _Rules:
    """The logit rules every decoding step applies: no end token before ``min_length``, a repetition penalty."""

    def __init__(self, min_length: int, repetition_penalty: float, eos_id: int) -> None:
        self.min_length, self.penalty, self.eos_id = min_length, repetition_penalty, eos_id

    def __call__(self, logits: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        if out.shape[1] < self.min_length:
            logits[:, self.eos_id] = float("-inf")
        if self.penalty != 1.0:
            seen = logits.gather(1, out)
            seen = torch.where(seen < 0, seen * self.penalty, seen / self.penalty)
            logits = logits.scatter(1, out, seen)
        return logits


def _picker(
    method: str, top_k: int, top_p: float, temperature: float, generator: torch.Generator | None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """How the next token is chosen from the logits (B, V): the largest, or a sample after top-k/top-p filtering."""
    if method == "greedy":
        return lambda logits: logits.argmax(dim=-1)
    if temperature <= 0:
        raise LipkitError(f"temperature must be > 0, got {temperature}")
    if method == "top_k" and top_k < 1:
        raise LipkitError(f"top_k must be >= 1, got {top_k}")
    if method == "top_p" and not 0 < top_p <= 1:
        raise LipkitError(f"top_p must be in (0, 1], got {top_p}")

    def pick(logits: torch.Tensor) -> torch.Tensor:
        if method == "top_k":
            kth = logits.topk(min(top_k, logits.shape[1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        else:  # keep the fewest most probable tokens whose probabilities reach top_p
            ordered, order = logits.sort(dim=-1, descending=True)
            probs = ordered.softmax(dim=-1)
            drop_sorted = probs.cumsum(dim=-1) - probs >= top_p  # the better tokens already reach top_p
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        probs = (logits / temperature).softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]

    return pick


class _Decoding:
    """Next-token logits for captions that grow by one token per step."""

    def next_logits(self, out: torch.Tensor) -> torch.Tensor:
        """Logits (B, vocab) for the token after ``out`` (B, t), whose last token is new since the last call."""
        raise NotImplementedError

    def select(self, rows: torch.Tensor) -> None:
        """Keep (reorder, repeat) the batch rows ``rows`` of every cached state, as beam search moves beams."""


class _FullDecoding(_Decoding):
    """Reruns both text layers and the decoder over the whole caption each step: for text towers that are not
    causal (a Hugging Face encoder), where a new token changes the states of the earlier ones."""

    def __init__(self, model: CoCa, image_tokens: torch.Tensor) -> None:
        self.model, self.image_tokens = model, image_tokens

    def next_logits(self, out: torch.Tensor) -> torch.Tensor:
        _, states = self.model.text.pooled_and_tokens(out)
        return self.model.decoder(self.image_tokens, states)[:, -1]

    def select(self, rows: torch.Tensor) -> None:
        self.image_tokens = self.image_tokens[rows]


class _CachedDecoding(_Decoding):
    """Computes only the new token each step, from cached keys and values: the text tower's and the
    decoder's self-attention, and the image tokens' keys and values, computed once. Exact for a causal
    text tower: earlier tokens never see later ones."""

    def __init__(self, model: CoCa, image_tokens: torch.Tensor) -> None:
        self.text, self.decoder = model.text, model.decoder
        self.text_caches = [KVCache() for _ in self.text.transformer.blocks]
        self.decoder_caches = [KVCache() for _ in self.decoder.blocks]
        self.image_kv = [cross.keys_values(image_tokens) for cross in self.decoder.cross]

    def next_logits(self, out: torch.Tensor) -> torch.Tensor:
        t = out.shape[1] - 1  # the new token's position
        if t >= self.text.pos_embed.shape[0] - int(self.text.cls_emb is not None):
            raise LipkitError(f"captions are limited to the text tower's context length {self.text.context_length}")
        x = self.text.token_embed(out[:, t:]) + self.text.pos_embed[t]  # (B, 1, W)
        mask = None
        if self.text.cls_emb is not None:  # padding keys are masked as the tower masks them
            mask = self.text.key_valid(out)[:, None, None, : t + 1]  # (B, 1, 1, t + 1)
        for block, cache in zip(self.text.transformer.blocks, self.text_caches, strict=True):
            x = block.step(x, cache, mask)
        if self.text.cls_emb is None:  # without a class token the decoder reads normalised states
            x = self.text.norm(x)
        for block, cross, cache, kv in zip(
            self.decoder.blocks, self.decoder.cross, self.decoder_caches, self.image_kv, strict=True
        ):
            x = cross.attend(block.step(x, cache), *kv)
        return self.decoder.head(self.decoder.norm(x))[:, 0]

    def select(self, rows: torch.Tensor) -> None:
        for cache in [*self.text_caches, *self.decoder_caches]:
            cache.select(rows)
        self.image_kv = [(k[rows], v[rows]) for k, v in self.image_kv]


def special_ids(tokenizer: Any) -> tuple[int, int]:
    """The start and end token ids of a model's tokenizer (:func:`lipkit.get_tokenizer`), for :meth:`CoCa.generate`."""
    sot = getattr(tokenizer, "sot_token_id", None)
    if sot is not None:
        return int(sot), int(tokenizer.eot_token_id)
    inner = getattr(tokenizer, "tokenizer", None)
    bos, eos = getattr(inner, "bos_token_id", None), getattr(inner, "eos_token_id", None)
    if bos is None or eos is None:
        bos = bos if bos is not None else getattr(inner, "cls_token_id", None)
        eos = eos if eos is not None else getattr(inner, "sep_token_id", None)
    if bos is None or eos is None:
        raise LipkitError(f"cannot tell the start and end tokens of {type(tokenizer).__name__}: pass sot_id and eos_id")
    return int(bos), int(eos)


def decode_captions(ids: torch.Tensor, tokenizer: Any, eos_id: int) -> list[str]:
    """Caption texts from :meth:`CoCa.generate`'s ids: the tokens after the start token, up to the end token."""
    texts = []
    for row in ids.tolist():
        row = row[1:]
        if eos_id in row:
            row = row[: row.index(eos_id)]
        texts.append(_decode(tokenizer, row).strip())
    return texts


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    if hasattr(tokenizer, "decode"):
        return tokenizer.decode(ids)
    inner = getattr(tokenizer, "tokenizer", None)
    if inner is not None and hasattr(inner, "decode"):
        return inner.decode(list(ids), skip_special_tokens=True)
    raise LipkitError(f"{type(tokenizer).__name__} cannot turn token ids back into text")

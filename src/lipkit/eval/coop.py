"""CoOp: learn the prompt's context words as vectors, with both towers frozen.

The prompt of class ``c`` is ``"X X ... X {classname}."``: M placeholder words, then the class name. Its token
ids are built with the model's CLIP tokenizer, and in the text tower the embeddings at the M placeholder
positions are replaced by M learned vectors shared by all classes (CoOp's unified context). The rest of the
tower runs as usual (position embeddings, causal transformer, final norm, pooling, projection), and gradients
reach the context through the frozen tower. Training uses cross-entropy on image-to-class cosine logits; the
image tower is frozen, so precomputed image features stand in for the images (hence no augmentation, unlike the
paper, which trains on random crops and flips).

Only lipkit's CLIP text transformer (:class:`~lipkit.models.text.TextTransformer`) with the CLIP BPE tokenizer
is supported; other text towers (e.g. Hugging Face encoders) raise :class:`~lipkit.errors.LipkitError`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lipkit.errors import LipkitError
from lipkit.models import DualEncoder, get_tokenizer
from lipkit.models.text import TextTransformer
from lipkit.models.tokenizer import ClipTokenizer

PLACEHOLDER = "X"


@dataclass
class CoopConfig:
    """CoOp's training settings (defaults from the paper: SGD, lr 0.002, batch 32, cosine schedule).

    Attributes:
        n_ctx: Number of context vectors M (ignored when ``init`` is given: M is then its token count).
        init: Words whose token embeddings initialise the context, e.g. ``"a photo of a"``; None for random
            N(0, 0.02^2) vectors.
        epochs: Passes over the shots; None for the paper's schedule (:func:`coop_epochs`).
        batch_size: Images per step.
        lr: SGD learning rate.
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        class_chunk: The most classes the text tower runs at once while back-propagating (bounds memory).
        seed: Seeds the random context and the order of the shots.
    """

    n_ctx: int = 4
    init: str | None = "a photo of a"
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    class_chunk: int = 128
    seed: int = 0


def coop_epochs(shots: int) -> int:
    """The paper's epochs for a number of shots per class: 50 for 1, 100 for 2-4, 200 for 8 or more."""
    return 50 if shots <= 1 else 100 if shots <= 4 else 200


def text_transformer(model: DualEncoder) -> TextTransformer:
    """The model's text tower, checked to be lipkit's CLIP text transformer."""
    if not isinstance(model.text, TextTransformer):
        raise LipkitError(
            f"CoOp needs lipkit's CLIP text transformer (text type 'transformer'); this model's text tower is "
            f"{type(model.text).__name__}, whose token embeddings CoOp cannot reach (Hugging Face text towers are "
            "not supported)"
        )
    return model.text


def prompt_tokens(tokenizer: ClipTokenizer, classnames: Sequence[str], n_ctx: int, context_length: int) -> torch.Tensor:
    """Token ids (C, T) of ``"X X ... X {classname}."`` with ``n_ctx`` placeholders, placeholders at 1..n_ctx.

    Args:
        tokenizer: The model's CLIP tokenizer.
        classnames: One name per class.
        n_ctx: Number of placeholders (context vectors).
        context_length: The text tower's context length T.

    Raises:
        LipkitError: ``n_ctx`` is not positive, or a prompt does not fit in ``context_length`` tokens.
    """
    if n_ctx < 1:
        raise LipkitError(f"CoOp needs at least one context vector, got n_ctx={n_ctx}")
    prompts = [" ".join([PLACEHOLDER] * n_ctx) + f" {name}." for name in classnames]
    for name, prompt in zip(classnames, prompts):
        needed = len(tokenizer.encode(prompt)) + 2  # start and end of text
        if needed > context_length:
            raise LipkitError(
                f"the CoOp prompt for class {name!r} needs {needed} tokens ({n_ctx} context vectors included) but "
                f"the text tower takes {context_length}: use fewer context vectors or a shorter class name"
            )
    tokens = tokenizer(prompts, context_length=context_length)
    placeholder = tokenizer.encode(PLACEHOLDER)
    if len(placeholder) != 1 or not bool((tokens[:, 1 : n_ctx + 1] == placeholder[0]).all()):
        raise LipkitError("the tokenizer does not put the CoOp placeholders right after the start-of-text token")
    return tokens


class CoopPrompts(nn.Module):
    """M context vectors shared by all classes, placed in front of each class name (CoOp's unified context).

    The module holds only the context (a parameter) and the prompts' token ids (a buffer); the text tower is
    passed to :meth:`forward`, so its weights are never part of this module's parameters or state.

    Args:
        model: A dual encoder whose text tower is a :class:`TextTransformer` with the CLIP tokenizer.
        classnames: One name per class.
        n_ctx: Number of context vectors (when ``init`` is None).
        init: Words whose token embeddings initialise the context; None for random vectors.
        generator: Random source for a random initialisation.
    """

    def __init__(
        self,
        model: DualEncoder,
        classnames: Sequence[str],
        n_ctx: int = 4,
        init: str | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        text = text_transformer(model)
        tokenizer = get_tokenizer(model.cfg)
        if not isinstance(tokenizer, ClipTokenizer):
            raise LipkitError(f"CoOp needs the CLIP BPE tokenizer; this model uses {type(tokenizer).__name__}")
        if not classnames:
            raise LipkitError("the list of class names is empty")
        embed = text.token_embed.weight
        if init is not None:
            ids = tokenizer.encode(init)
            if not ids:
                raise LipkitError(f"the CoOp context initialisation {init!r} has no tokens")
            ctx = embed.detach()[torch.tensor(ids, device=embed.device)].float().clone()  # (M, W)
        else:
            ctx = 0.02 * torch.randn(n_ctx, embed.shape[1], generator=generator)  # (M, W)
        self.n_ctx = ctx.shape[0]
        self.ctx = nn.Parameter(ctx.to(embed.device))
        self.register_buffer("tokens", prompt_tokens(tokenizer, classnames, self.n_ctx, text.context_length))

    def forward(self, text: TextTransformer, classes: slice = slice(None)) -> torch.Tensor:
        """Text features (C, D) of the prompts (of ``classes`` only, if given), not normalised."""
        tokens = self.tokens[classes]  # (C, T)
        x = text.token_embed(tokens)  # (C, T, W)
        ctx = self.ctx.to(x.dtype).unsqueeze(0).expand(len(tokens), -1, -1)  # (C, M, W)
        x = torch.cat([x[:, :1], ctx, x[:, 1 + self.n_ctx :]], dim=1) + text.pos_embed[: tokens.shape[1]]
        return text.proj(text.features_from_hidden(x, tokens, 0))  # the tower's own blocks, norm and pooling


def coop_loss(
    text_feats: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, scale: torch.Tensor | float
) -> torch.Tensor:
    """Cross-entropy of ``scale * f @ normalize(t).T`` for image features (B, D), text features (C, D)."""
    return F.cross_entropy(scale * feats @ F.normalize(text_feats, dim=-1).T, labels)


def coop_backward(
    prompts: CoopPrompts,
    text: TextTransformer,
    feats: torch.Tensor,
    labels: torch.Tensor,
    scale: torch.Tensor | float,
    class_chunk: int,
) -> float:
    """Accumulate the gradient of :func:`coop_loss` into the context; returns the loss.

    With more than ``class_chunk`` classes the text features are first computed without a graph, the loss's
    gradient with respect to them is taken, and the tower is then re-run and back-propagated ``class_chunk``
    classes at a time: the same gradient, with memory bounded by the chunk.
    """
    n_classes = len(prompts.tokens)
    if n_classes <= class_chunk:
        loss = coop_loss(prompts(text), feats, labels, scale)
        loss.backward()
        return loss.item()
    with torch.no_grad():
        text_feats = prompts(text)  # (C, D)
    text_feats.requires_grad_(True)
    loss = coop_loss(text_feats, feats, labels, scale)
    loss.backward()
    for start in range(0, n_classes, class_chunk):
        part = slice(start, start + class_chunk)
        prompts(text, part).backward(text_feats.grad[part])
    return loss.item()


@contextmanager
def frozen(model: nn.Module) -> Iterator[None]:
    """Freeze every parameter of ``model`` and put it in eval mode; restore both on exit."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def train_coop(
    model: DualEncoder,
    classnames: Sequence[str],
    feats: torch.Tensor,
    labels: torch.Tensor,
    config: CoopConfig | None = None,
    device: torch.device | str = "cpu",
) -> CoopPrompts:
    """Learn CoOp's context on image features of the shots; the model's weights are left untouched.

    Args:
        model: The dual encoder (its text tower must be a :class:`TextTransformer`).
        classnames: One name per class.
        feats: L2-normalised image features of the shots (N, D).
        labels: Their labels (N,).
        config: Training settings.
        device: Where to train.

    Returns:
        The learned prompts.
    """
    config = config or CoopConfig()
    _check_shots(feats, labels, len(classnames))
    generator = torch.Generator().manual_seed(config.seed)
    model.to(device)
    text = text_transformer(model)
    prompts = CoopPrompts(model, classnames, config.n_ctx, config.init, generator).to(device)
    feats, labels = feats.to(device).float(), labels.to(device)
    epochs = config.epochs or coop_epochs(int(torch.bincount(labels, minlength=len(classnames)).min()))
    opt = torch.optim.SGD([prompts.ctx], lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * math.ceil(len(feats) / config.batch_size))
    with frozen(model), torch.enable_grad():
        scale = model.scale().detach()
        for _ in range(epochs):
            for batch in torch.randperm(len(feats), generator=generator).to(device).split(config.batch_size):
                opt.zero_grad()
                coop_backward(prompts, text, feats[batch], labels[batch], scale, config.class_chunk)
                opt.step()
                sched.step()
    return prompts


def _check_shots(feats: torch.Tensor, labels: torch.Tensor, n_classes: int) -> None:
    """Raise a clear error for shot features and labels that do not fit together or the class names."""
    if feats.ndim != 2 or labels.shape != (len(feats),) or len(feats) == 0:
        raise LipkitError(
            f"CoOp needs features (N, D) and labels (N,), got {tuple(feats.shape)} and {tuple(labels.shape)}"
        )
    if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise LipkitError(f"labels must lie in 0..{n_classes - 1} (one per class name)")


@torch.no_grad()
def coop_logits(prompts: CoopPrompts, model: DualEncoder, feats: torch.Tensor, class_chunk: int = 128) -> torch.Tensor:
    """Class logits (N, C), ``scale * f @ t.T``, for image features (N, D) with the learned prompts."""
    text = text_transformer(model)
    n_classes = len(prompts.tokens)
    text_feats = torch.cat([prompts(text, slice(i, i + class_chunk)) for i in range(0, n_classes, class_chunk)])
    return model.scale() * feats.to(text_feats.device).float() @ F.normalize(text_feats.float(), dim=-1).T


def coop_hook(
    model: DualEncoder,
    classnames: Sequence[str],
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    config: CoopConfig | None = None,
    device: torch.device | str = "cpu",
) -> Callable[[torch.Tensor], torch.Tensor]:
    """A ``coop_fn`` for :func:`lipkit.eval.fewshot.run_fewshot`: K-shot indices -> CoOp's test logits (CPU).

    Args:
        model: The dual encoder.
        classnames: One name per class.
        train_feats: Image features of the training pool (N, D) that the indices point into.
        train_labels: Its labels (N,).
        test_feats: Image features of the test set (M, D).
        config: CoOp settings.
        device: Where to train.
    """
    text_transformer(model)  # fail before any work for an unsupported text tower
    config = config or CoopConfig()

    def coop_fn(indices: torch.Tensor) -> torch.Tensor:
        indices = indices.to(train_feats.device)
        prompts = train_coop(model, classnames, train_feats[indices], train_labels[indices], config, device)
        return coop_logits(prompts, model, test_feats, config.class_chunk).cpu()

    return coop_fn

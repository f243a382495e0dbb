"""Eval-mode BatchNorm folded into the convolution before it, for frozen convolutional trunks.

In eval mode a BatchNorm layer is a fixed per-channel affine map, so the convolution that feeds it can
absorb it: ``bn(conv(x)) == conv'(x)`` with weights ``w * s`` and bias ``(b - mean) * s + beta``, where
``s = gamma / sqrt(var + eps)``. The trunk then skips one pass over every such activation map (on a
2-core CPU EfficientNet-Lite0 runs 1.36x as fast, CLIP's RN50 1.29x; ``benchmarks/tower_features.py``).

:func:`fold_batchnorm` finds the pairs by running the trunk once on a sample input with hooks (a pair is
a convolution whose output tensor is exactly what the BatchNorm receives), switches their classes to
the folding ones below, runs the sample again and keeps the folding only if the output agrees with
the unfolded one to rounding; otherwise it restores the classes. The modules keep their parameters,
buffers and names, so state dicts, checkpoints and fingerprints are unchanged. A pair folds only when
it may: BatchNorm in eval mode, and either no gradient recorded or none of the pair's parameters
trainable; otherwise (training, a trainable trunk, ``torch.compile`` tracing) both run as before.
The folded weights are cached and recomputed when any of their tensors changes (version counters,
storage and device), as after ``load_state_dict`` or ``.to()``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

try:
    from timm.layers.conv2d_same import Conv2dSame, conv2d_same
    from timm.layers.norm_act import BatchNormAct2d
except ImportError:  # timm is optional (lipkit[towers]); its layers are then simply absent
    Conv2dSame = conv2d_same = BatchNormAct2d = None


def _active(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    """Whether the pair may run folded now (eval-mode statistics, no gradient into its parameters)."""
    if bn.training or conv.training or torch.compiler.is_compiling():
        return False
    if not torch.is_grad_enabled():
        return True
    params = (conv.weight, conv.bias, bn.weight, bn.bias)
    return not any(p is not None and p.requires_grad for p in params)


def _tensor_key(t: torch.Tensor | None) -> tuple[Any, ...]:
    if t is None:
        return ()
    return (t._version, t.data_ptr(), t.device, t.dtype)


class _FoldedConv:
    """Mixin: a convolution that absorbs the eval-mode BatchNorm after it (``_fold_bn``)."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self.__dict__["_fold_bn"]
        if not _active(self, bn):  # type: ignore[arg-type]
            return super().forward(x)  # type: ignore[misc]
        weight, bias = self._folded(bn)
        return self._conv(x, weight, bias)

    def _folded(self, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
        tensors = (self.weight, self.bias, bn.weight, bn.bias, bn.running_mean, bn.running_var)
        key = (torch.is_inference_mode_enabled(), *(_tensor_key(t) for t in tensors))
        cached = self.__dict__.get("_fold_cache")
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.no_grad():
            var, mean = bn.running_var.float(), bn.running_mean.float()
            scale = torch.rsqrt(var + bn.eps)
            if bn.weight is not None:
                scale = scale * bn.weight.float()
            shift = -mean * scale
            if bn.bias is not None:
                shift = shift + bn.bias.float()
            if self.bias is not None:
                shift = shift + self.bias.float() * scale
            weight = (self.weight.float() * scale.view(-1, 1, 1, 1)).to(self.weight.dtype)
            bias = shift.to(self.weight.dtype)
        self.__dict__["_fold_cache"] = (key, weight, bias)
        return weight, bias

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class FoldedConv2d(_FoldedConv, nn.Conv2d):
    """``nn.Conv2d`` with its BatchNorm folded in (see the module docstring)."""

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, weight, bias)


class FoldedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose affine map its convolution already applied, when folded."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if _active(self.__dict__["_fold_conv"], self) else super().forward(x)


FOLDED: dict[type, type] = {nn.Conv2d: FoldedConv2d, nn.BatchNorm2d: FoldedBatchNorm2d}

if Conv2dSame is not None:

    class FoldedConv2dSame(_FoldedConv, Conv2dSame):
        """timm's TensorFlow-padded ``Conv2dSame`` with its BatchNorm folded in."""

        def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return conv2d_same(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)

    class FoldedBatchNormAct2d(BatchNormAct2d):
        """timm's ``BatchNormAct2d`` (BatchNorm, dropout, activation): only the last two when folded."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if _active(self.__dict__["_fold_conv"], self):
                return self.act(self.drop(x))
            return super().forward(x)

    FOLDED |= {Conv2dSame: FoldedConv2dSame, BatchNormAct2d: FoldedBatchNormAct2d}

UNFOLDED = {folded: plain for plain, folded in FOLDED.items()}


def _pairs(
    modules: Sequence[nn.Module], run: Callable[[], torch.Tensor]
) -> tuple[list[tuple[nn.Conv2d, nn.BatchNorm2d]], torch.Tensor]:
    """The (convolution, BatchNorm) pairs of ``modules`` in which the BatchNorm takes exactly the
    convolution's output, each called once in ``run()`` (only the layer classes :data:`FOLDED` knows),
    and ``run()``'s output, unfolded."""
    outputs: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    calls: dict[nn.Module, int] = {}
    pairs: dict[nn.Module, nn.Module] = {}

    def after_conv(conv: nn.Module, _: Any, out: torch.Tensor) -> None:
        calls[conv] = calls.get(conv, 0) + 1
        outputs[id(out)] = (conv, out)  # the tensor is kept, so its id is not reused

    def before_bn(bn: nn.Module, args: tuple[Any, ...]) -> None:
        calls[bn] = calls.get(bn, 0) + 1
        found = outputs.get(id(args[0])) if args else None
        if found is not None and found[1] is args[0]:
            pairs[bn] = found[0]

    handles = []
    for m in (m for root in modules for m in root.modules()):
        if type(m) in (nn.Conv2d, Conv2dSame) and m.padding_mode == "zeros":
            handles.append(m.register_forward_hook(after_conv))
        elif type(m) in (nn.BatchNorm2d, BatchNormAct2d) and m.running_mean is not None:
            handles.append(m.register_forward_pre_hook(before_bn))
    try:
        with torch.no_grad():
            output = run()
    finally:
        for h in handles:
            h.remove()
    paired = Counter(pairs.values())
    found = [
        (conv, bn)
        for bn, conv in pairs.items()
        if calls[bn] == 1 and calls[conv] == 1 and paired[conv] == 1 and conv.out_channels == bn.num_features
    ]
    return found, output  # type: ignore[return-value]


def _set_classes(pairs: list[tuple[nn.Conv2d, nn.BatchNorm2d]], fold: bool) -> None:
    for conv, bn in pairs:
        if fold:
            conv.__class__, bn.__class__ = FOLDED[type(conv)], FOLDED[type(bn)]
            conv.__dict__["_fold_bn"], bn.__dict__["_fold_conv"] = bn, conv  # plain references, not submodules
        else:
            conv.__class__, bn.__class__ = UNFOLDED[type(conv)], UNFOLDED[type(bn)]
            for m, name in ((conv, "_fold_bn"), (conv, "_fold_cache"), (bn, "_fold_conv")):
                m.__dict__.pop(name, None)


def fold_batchnorm(
    modules: nn.Module | Sequence[nn.Module], run: Callable[[], torch.Tensor], rtol: float = 1e-4
) -> int:
    """Fold the eval-mode BatchNorm layers of ``modules`` into the convolutions before them; the number folded.

    Args:
        modules: The trunk (or its parts), in eval mode.
        run: Runs them on a sample input (e.g. one image) and returns the output; called twice (once
            unfolded, with hooks that find the pairs; once folded, to check).
        rtol: How close the folded output must be to the unfolded one, relative to its largest value;
            if it is not, nothing is folded (0 is returned).
    """
    pairs, want = _pairs([modules] if isinstance(modules, nn.Module) else modules, run)
    if not pairs:
        return 0
    _set_classes(pairs, fold=True)
    with torch.no_grad():
        got = run()
    if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=rtol * float(want.abs().max()) + 1e-12):
        _set_classes(pairs, fold=False)
        return 0
    return len(pairs)


def fold_when_frozen(
    modules: Sequence[nn.Module], images: torch.Tensor, run: Callable[[torch.Tensor], torch.Tensor]
) -> int | None:
    """Fold the BatchNorm layers of a trunk's ``modules`` (:func:`fold_batchnorm`) if it now runs frozen.

    For a tower's first forward passes: returns ``None`` (try again next time) while the trunk trains
    (a module in training mode, gradients into its weights, ``torch.compile`` tracing), ``0`` for a
    trunk that never folds (sharded by FSDP: its parameters are DTensors), else the number of pairs
    folded, with ``run(images[:1])`` as the sample.
    """
    if not len(images) or images.is_meta or any(m.training for m in modules) or torch.compiler.is_compiling():
        return None
    params = [p for m in modules for p in m.parameters()]
    if any(type(p.data) is not torch.Tensor for p in params):
        return 0
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return None
    sample = images[:1]
    return fold_batchnorm(modules, lambda: run(sample))

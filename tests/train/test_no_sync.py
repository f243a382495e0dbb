"""The training step keeps its loss and gradient norm on the device: nothing is read back to the host
until a logging step (see ``train_step``, ``check_window`` and ``log_window`` in ``lipkit.train.loop``).

On CPU a read-back is no synchronisation, so the CPU tests count the calls that would be one on an
accelerator (``Tensor.item``, ``bool(tensor)``, ``float(tensor)``, ``.tolist()``, ``.cpu()`` ...). On CUDA,
``torch.cuda.set_sync_debug_mode("error")`` turns any synchronising call into an error.
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from lipkit.train import loop
from lipkit.train.config import resolve_config
from lipkit.train.distributed import DistEnv

TENSOR_READS = (
    "item",
    "tolist",
    "cpu",
    "numpy",
    "__bool__",
    "__float__",
    "__int__",
    "__index__",
    "__format__",
    "equal",
    "allclose",
)
TORCH_READS = ("equal", "allclose", "is_nonzero")
STEPS = 6


class ReadCounter:
    """Counts host read-backs of tensor values, and where they come from, while :meth:`counting`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.active = False
        self.calls: Counter[str] = Counter()
        for name in TENSOR_READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(f"Tensor.{name}", getattr(torch.Tensor, name)))
        for name in TORCH_READS:
            monkeypatch.setattr(torch, name, self._wrap(f"torch.{name}", getattr(torch, name)))

    def _wrap(self, name: str, read: Callable) -> Callable:
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                caller = traceback.extract_stack(limit=2)[0]
                self.calls[f"{name} at {caller.filename}:{caller.lineno}"] += 1
            return read(*args, **kwargs)

        return counted

    @contextmanager
    def counting(self) -> Iterator[Counter[str]]:
        """Count the reads inside the block; yields the calls seen in it."""
        before, was_active, self.active = self.calls.copy(), self.active, True
        seen: Counter[str] = Counter()
        try:
            yield seen
        finally:
            self.active = was_active
            seen.update(self.calls - before)


def count_reads_per_step(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Counter[str]], list[Counter[str]]]:
    """Patch the loop so each ``train_step`` and each whole step (``run_one``) records its reads."""
    reads = ReadCounter(monkeypatch)
    in_step: list[Counter[str]] = []
    in_run_one: list[Counter[str]] = []
    train_step, run_one = loop.train_step, loop.run_one

    def counted_train_step(*args: Any) -> torch.Tensor:
        with reads.counting() as seen:
            out = train_step(*args)
        in_step.append(seen)
        return out

    def counted_run_one(*args: Any) -> Any:
        with reads.counting() as seen:
            out = run_one(*args)
        in_run_one.append(seen)
        return out

    monkeypatch.setattr(loop, "train_step", counted_train_step)
    monkeypatch.setattr(loop, "run_one", counted_run_one)
    return in_step, in_run_one


def test_read_counter_sees_reads(monkeypatch):
    reads = ReadCounter(monkeypatch)
    x = torch.ones(2)
    with reads.counting() as seen:
        x.sum().item()
        bool(x.all())
        float(x[0])
        x.tolist()
        f"{x[0]:.2f}"
        torch.equal(x, x)
    names = {key.split(" at ")[0] for key in seen}
    assert {"Tensor.item", "Tensor.__bool__", "Tensor.__float__", "Tensor.tolist", "Tensor.__format__"} <= names
    assert "torch.equal" in names


@pytest.mark.parametrize(
    "extra",
    [
        [],  # micro model, InfoNCE, gradient clipping at 1.0
        ["optim.grad_clip=null"],
        ["precision=bf16"],
        ["model=tiny-siglip", "loss=siglip", "data.batch_size=8"],
    ],
    ids=["clip", "no-clip", "bf16", "siglip"],
)
def test_train_step_reads_nothing_back_until_a_log_step(run_overrides, monkeypatch, extra):
    in_step, in_run_one = count_reads_per_step(monkeypatch)
    overrides = [f"steps={STEPS}", "log_every=100", "checkpoint_every=100", "data.workers=0", *extra]
    result = loop.train(resolve_config("tiny-synthetic", overrides=[*run_overrides, *overrides]))
    assert result.step == STEPS and len(in_step) == len(in_run_one) == STEPS
    assert all(not seen for seen in in_step), [dict(seen) for seen in in_step]
    # The whole step, bookkeeping included, reads nothing either, except at the last step: it logs and saves.
    assert all(not seen for seen in in_run_one[:-1]), [dict(seen) for seen in in_run_one[:-1]]
    assert in_run_one[-1], "the logging step reads the window back; if this fails the counter counts nothing"


def test_train_step_returns_its_record_on_the_device(run_overrides):
    cfg = resolve_config("tiny-synthetic", overrides=[*run_overrides, "data.workers=0"])
    state = loop.build_state(cfg, DistEnv(), torch.device("cpu"))
    images, tokens = synthetic_batch(state, 4, torch.device("cpu"))
    record = loop.train_step(state, cfg, images, tokens)
    assert isinstance(record, torch.Tensor) and record.shape == (2,) and record.requires_grad is False
    assert torch.isfinite(record).all() and state.step == 1


def synthetic_batch(state: loop.TrainState, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images and end-of-text-terminated token ids that fit the state's model, on ``device``."""
    gen = torch.Generator().manual_seed(0)
    size = state.model.cfg.vision_config().image_size
    text = state.model.cfg.text_config()
    images = torch.randn(batch, 3, size, size, generator=gen)
    tokens = torch.randint(1, text.vocab_size - 1, (batch, text.context_length), generator=gen)
    tokens[:, -1] = text.vocab_size - 1
    return images.to(device), tokens.to(device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(
    "extra",
    [
        ["compile=null"],
        ["compile=null", "optim.grad_clip=null"],
        ["compile=null", "precision=bf16"],
        ["compile=null", "model=tiny-siglip", "loss=siglip"],
        ["compile=auto", "precision=bf16"],
    ],
    ids=["clip", "no-clip", "bf16", "siglip", "compiled-bf16"],
)
def test_train_step_does_not_synchronise_on_cuda(tmp_path, extra):
    cfg = resolve_config(
        "tiny-synthetic",
        overrides=[f"out_dir={tmp_path}", "progress=false", "tensorboard=false", "device=cuda", *extra],
    )
    device = torch.device("cuda")
    state = loop.build_state(cfg, DistEnv(), device)
    images, tokens = synthetic_batch(state, 8, device)
    loop.train_step(state, cfg, images, tokens)  # the first step creates the optimizer state and warms up kernels
    torch.cuda.synchronize()
    records = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            records.append(loop.train_step(state, cfg, images, tokens))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(r.device.type == "cuda" for r in records)
    assert torch.isfinite(torch.stack(records)).all()

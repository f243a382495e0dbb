"""Peak memory of a training step: lipkit vs OpenCLIP on the same config, side by side, on any machine.

Both libraries build the same architecture; each runs two steps of forward + InfoNCE + backward + fused
AdamW (the second holds the optimizer state too) under PyTorch's ``MemTracker`` on fake tensors: every
op's outputs are created with their real sizes and lifetimes, but no memory is allocated and nothing
is computed, so ViT-B-16 at batch 512 takes seconds on a laptop. Prints the peak by kind (parameters,
gradients, optimizer state, activations, temporaries, inputs) and the lipkit/OpenCLIP ratio.

    python benchmarks/train_memory.py --model ViT-B-16 --batch-size 512
    python benchmarks/train_memory.py --model ViT-B-32 --batch-size 1024 --json results.jsonl

The count is of tensor bytes, as ``torch.cuda.max_memory_allocated`` would report them without the
allocator's rounding and fragmentation, and with the CPU's choice of kernels. One difference from a
CUDA run matters here: CUDA autocast computes LayerNorm in float32 by upcasting its input, a copy that
autograd keeps, while CPU autocast runs it in bf16. OpenCLIP's LayerNorms therefore keep more on a GPU
than counted here (lipkit's compute in float32 on both and keep the bf16 input); on a GPU,
``benchmarks/train_throughput.py --device cuda`` measures the real peaks.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker

import lipkit
from lipkit.models import get_model_config
from results import append_result
from train_throughput import lipkit_step, openclip_model, openclip_step  # the same models and steps

KINDS = {  # MemTracker's categories, in the order printed
    "Parameter": "parameters",
    "Gradient": "gradients",
    "Optstate": "optimizer state",
    "Activation": "activations",
    "Temp": "temporaries",
    "Other": "inputs",
}


class PeakTracker(MemTracker):
    """``MemTracker``'s peak by kind, without its per-module snapshots.

    Those refuse a module that runs twice in one step, as micro-batched steps do; the module hook
    still tags parameters' gradients as gradients.
    """

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
        self._track_module_params_and_buffers(module, install_grad_hooks=True)

    def _post_fw_hook(self, module: torch.nn.Module, inputs: Any, outputs: Any) -> None:
        pass

    def _pre_bw_hook(self, module: torch.nn.Module, args: Any) -> None:
        pass

    def _post_bw_hook(self, module: torch.nn.Module, args: Any) -> None:
        pass


def count_peak(setup: Callable[[], tuple[list, Callable[[], None]]], steps: int = 2) -> dict[str, float]:
    """Peak tensor memory, in GiB by kind (and ``total``), of ``steps`` calls of a training step on fake tensors.

    ``setup()`` builds (under the fake mode) what the step needs and returns the modules, optimizers and
    tensors to track, and the step. Two steps: the second also holds the optimizer state.
    """
    with FakeTensorMode():
        torch.manual_seed(0)
        tracked, step = setup()
        tracker = PeakTracker()
        tracker.track_external(*tracked)
        with tracker:
            for _ in range(steps):
                step()
        (snapshot,) = tracker.get_tracker_snapshot("peak").values()
    by_kind = {str(getattr(k, "value", k)): v / 2**30 for k, v in snapshot.items()}
    peak = {label: by_kind.get(kind, 0.0) for kind, label in KINDS.items()}
    peak["total"] = by_kind["Total"]
    return peak


def synthetic_inputs(name: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random images and full-length token ids for model config ``name``."""
    cfg = get_model_config(name)
    size, ctx = cfg.vision_config().image_size, cfg.text_config().context_length
    return torch.randn(batch, 3, size, size), torch.randint(1, 49406, (batch, ctx))


def peak_memory(build: Callable[[], torch.nn.Module], make_step, name: str, batch: int, precision: str) -> dict:
    """The peak of tensor memory over two training steps of model + loss + fused AdamW, by kind."""
    dtype = torch.bfloat16 if precision == "bf16" else None

    def setup() -> tuple[list, Callable[[], None]]:
        model = build().train()
        loss_step = make_step(model)
        images, tokens = synthetic_inputs(name, batch)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step() -> None:
            with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                loss = loss_step(images, tokens)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return [model, opt, images, tokens], step

    return count_peak(setup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="lipkit model config (default: ViT-B-16)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="bf16: autocast (default)")
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    args = parser.parse_args()

    peaks = {
        "lipkit": peak_memory(
            lambda: lipkit.create_model(args.model), lipkit_step, args.model, args.batch_size, args.precision
        ),
        "openclip": peak_memory(
            lambda: openclip_model(args.model), openclip_step, args.model, args.batch_size, args.precision
        ),
    }
    unit, scale = ("GiB", 1) if peaks["openclip"]["total"] >= 1 else ("MiB", 1024)
    print(
        f"model {args.model}, batch {args.batch_size}, {args.precision}, peak tensor memory of a training step "
        f"({unit}), counted on fake tensors, torch {torch.__version__}"
    )
    print(f"{'':>16}" + "".join(f"{name:>10}" for name in peaks))
    for label in [*KINDS.values(), "total"]:
        print(f"{label:>16}" + "".join(f"{p[label] * scale:10.2f}" for p in peaks.values()))
    ratio = peaks["lipkit"]["total"] / peaks["openclip"]["total"]
    print(f"ratio lipkit/openclip: {ratio:.2f}x peak memory")
    row = {
        "model": args.model,
        "batch": args.batch_size,
        "precision": args.precision,
        "torch": torch.__version__,
        "peak_gib": peaks,
        "ratio_peak_memory": ratio,
    }
    append_result(args.json, "train_memory", row)


if __name__ == "__main__":
    main()

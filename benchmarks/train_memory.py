"""Peak memory of a training step: lipkit vs OpenCLIP on the same config, side by side, on any machine.

Both libraries build the same architecture; each runs two steps of forward + InfoNCE + backward + fused
AdamW (the second holds the optimizer state too) under PyTorch's ``MemTracker`` on fake tensors: every
op's outputs are created with their real sizes and lifetimes, but no memory is allocated and nothing
is computed, so ViT-B-16 at batch 512 takes seconds on a laptop. Prints the peak by kind (parameters,
gradients, optimizer state, activations, temporaries, inputs) and the lipkit/OpenCLIP ratio.

    python benchmarks/train_memory.py --model ViT-B-16 --batch-size 512
    python benchmarks/train_memory.py --model ViT-B-32 --batch-size 1024 --json results.jsonl

The count is of tensor bytes, as ``torch.cuda.max_memory_allocated`` would report them without the
allocator's rounding and fragmentation, and with the CPU's choice of kernels. One difference between
the devices matters here: CUDA autocast computes LayerNorm in float32 by upcasting its input, a copy
that autograd keeps, while CPU autocast runs it in bf16. By default the count applies CUDA's rule
(``--autocast-policy cuda``), which makes it stand for a GPU run: for OpenCLIP it gives 36.2, 43.2 and
37.8 GiB for the anchor configs of docs/benchmarks.md, where an H100 measured 36.1, 43.0 and 36.5.
``--autocast-policy cpu`` counts the CPU's own rule. On a GPU,
``benchmarks/train_throughput.py --device cuda`` measures the real peaks.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.overrides import TorchFunctionMode

import lipkit
from results import append_result
from train_throughput import (  # the same models, steps and inputs
    lipkit_step,
    openclip_model,
    openclip_step,
    synthetic_inputs,
)

LOW_PRECISION = (torch.bfloat16, torch.float16)
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


class CudaAutocastNorms(TorchFunctionMode):
    """CUDA autocast's rule for LayerNorm, on the CPU: a low-precision input is upcast to float32 first.

    CUDA autocast runs ``layer_norm`` in float32 (it is on its float32 list), and autograd keeps the
    upcast copy of the input; CPU autocast runs it in the input's dtype. Applying the CUDA rule makes a
    count on the CPU stand for a GPU run. Only calls made while autocast is on are touched (lipkit's
    LayerNorm turns autocast off around its own float32 computation).
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm and torch.is_autocast_enabled("cpu") and args[0].dtype in LOW_PRECISION:
            x, shape, *rest = args
            rest = [t.float() if isinstance(t, torch.Tensor) else t for t in rest]
            kwargs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return func(x.float(), shape, *rest, **kwargs)
        return func(*args, **kwargs)


def count_peak(
    setup: Callable[[], tuple[list, Callable[[], None]]], steps: int = 2, policy: str = "cuda"
) -> dict[str, float]:
    """Peak tensor memory, in GiB by kind (and ``total``), of ``steps`` calls of a training step on fake tensors.

    ``setup()`` builds (under the fake mode) what the step needs and returns the modules, optimizers and
    tensors to track, and the step. Two steps: the second also holds the optimizer state. ``policy``
    ``cuda`` applies CUDA autocast's LayerNorm rule (:class:`CudaAutocastNorms`), ``cpu`` the CPU's own.
    """
    with FakeTensorMode(), CudaAutocastNorms() if policy == "cuda" else nullcontext():
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


def peak_memory(
    build: Callable[[], torch.nn.Module], make_step, name: str, batch: int, precision: str, policy: str
) -> dict:
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

    return count_peak(setup, policy=policy)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-16", help="lipkit model config (default: ViT-B-16)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="bf16: autocast (default)")
    parser.add_argument(
        "--autocast-policy",
        choices=["cuda", "cpu"],
        default="cuda",
        help="whose autocast rule for LayerNorm to count with: CUDA's (float32, a GPU run; default) or the CPU's",
    )
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    args = parser.parse_args()

    policy = args.autocast_policy
    peaks = {
        "lipkit": peak_memory(
            lambda: lipkit.create_model(args.model), lipkit_step, args.model, args.batch_size, args.precision, policy
        ),
        "openclip": peak_memory(
            lambda: openclip_model(args.model), openclip_step, args.model, args.batch_size, args.precision, policy
        ),
    }
    unit, scale = ("GiB", 1) if peaks["openclip"]["total"] >= 1 else ("MiB", 1024)
    print(
        f"model {args.model}, batch {args.batch_size}, {args.precision} ({policy} autocast rules), peak tensor "
        f"memory of a training step ({unit}), counted on fake tensors, torch {torch.__version__}"
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
        "autocast_policy": policy,
        "torch": torch.__version__,
        "peak_gib": peaks,
        "ratio_peak_memory": ratio,
    }
    append_result(args.json, "train_memory", row)


if __name__ == "__main__":
    main()

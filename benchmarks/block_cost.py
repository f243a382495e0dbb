"""What lipkit's lean transformer block costs and saves, against the same block built from plain layers.

lipkit's block recomputes the MLP's nonlinearity in the backward pass and keeps bf16 LayerNorm inputs
rather than their float32 copies (docs/guide.md, "Lean activations"). The plain block composes the
same weights with PyTorch's own ``nn.Linear``, ``F.gelu`` and ``F.layer_norm``, which keep every
output. Both run forward + backward on the same input, in alternating rounds; the script prints the
time of each, the bytes each keeps for the backward pass per token, and the ratios.

    python benchmarks/block_cost.py                                  # ViT-B-16's block, batch 8, CPU
    python benchmarks/block_cost.py --device cuda --batch-size 512   # on a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lipkit.models.layers import Block, activation
from results import append_result


def plain_block(block: Block):
    """``block``'s computation from plain PyTorch layers (autograd keeps what they keep)."""

    def norm(layer, x: torch.Tensor) -> torch.Tensor:
        weight, bias = layer.weight.float(), layer.bias.float()
        return F.layer_norm(x.float(), layer.normalized_shape, weight, bias, layer.eps).to(x.dtype)

    def forward(x: torch.Tensor) -> torch.Tensor:
        x = x + block.attn(norm(block.norm1, x))
        return x + block.mlp.fc2(activation(block.mlp.fc1(norm(block.norm2, x)), block.mlp.act))

    return forward


def saved_bytes(fn, x: torch.Tensor, weights: list[torch.Tensor]) -> int:
    """Bytes of activations autograd keeps for the backward pass of ``fn(x)`` (weights and their casts not counted)."""
    skip = {w.untyped_storage().data_ptr() for w in weights}
    shapes = {w.shape for w in weights} | {w.t().shape for w in weights if w.ndim == 2}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in skip and t.shape not in shapes:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x)
    return sum(kept.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--tokens", type=int, default=197)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="bf16: autocast (default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds; the median is reported")
    parser.add_argument("--steps", type=int, default=3, help="forward + backward passes per round")
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    block = Block(args.width, args.heads).to(device)
    bf16 = args.precision == "bf16"
    x = torch.randn(args.batch_size, args.tokens, args.width, device=device)
    x = (x.bfloat16() if bf16 else x).requires_grad_()
    sides = {"lean": block, "plain": plain_block(block)}

    def step(fn) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fn(x)
        out.float().sum().backward()

    def timed(fn) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.steps):
            step(fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / args.steps

    weights = list(block.parameters())
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        kept = {name: saved_bytes(fn, x, weights) / (x.shape[0] * x.shape[1]) for name, fn in sides.items()}
    for fn in sides.values():  # warm-up
        step(fn)
    seconds: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, fn in sides.items():
            seconds[name].append(timed(fn))
    med = {name: statistics.median(s) for name, s in seconds.items()}
    print(
        f"block width {args.width}, {args.heads} heads, {args.tokens} tokens, batch {args.batch_size}, "
        f"{args.precision}, {device}, torch {torch.__version__}: forward + backward"
    )
    for name in sides:
        print(f"{name:>6}: {1e3 * med[name]:9.2f} ms   keeps {kept[name] / 1024:6.2f} KiB per token")
    time_ratio, memory_ratio = med["lean"] / med["plain"], kept["lean"] / kept["plain"]
    print(f"ratio lean/plain: {time_ratio:.3f}x time, {memory_ratio:.3f}x kept for backward")
    row = {k: getattr(args, k) for k in ("width", "heads", "tokens", "batch_size", "precision")}
    row["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    row |= {"torch": torch.__version__, "ms": {name: 1e3 * m for name, m in med.items()}}
    row |= {"kept_bytes_per_token": kept, "ratio_time": time_ratio, "ratio_kept": memory_ratio}
    append_result(args.json, "block_cost", row)


if __name__ == "__main__":
    main()

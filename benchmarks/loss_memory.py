"""Contrastive loss memory and time: lipkit's streaming (tiled) losses vs the plain B x B loss.

Each measurement runs in a fresh process (forward + backward of the loss alone on random
L2-normalised features), so peak memory is that of the loss: ``torch.cuda.max_memory_allocated`` on a
GPU, the growth of the process's peak resident memory on a CPU. Prints both, and the ratios.

    python benchmarks/loss_memory.py --batch 8192                         # CPU
    python benchmarks/loss_memory.py --batch-size 262144 --device cuda --skip-plain --tile 4096
    python benchmarks/loss_memory.py --batch-size 262144 --device cuda --skip-plain --tile 4096 --loss siglip
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

from lipkit.cli.options import add_alias
from results import append_result


def measure(kind: str, loss_name: str, batch: int, dim: int, tile: int, device: str, dtype: str) -> dict[str, float]:
    """Forward + backward of one loss; returns seconds and peak memory (MiB).

    ``loss_mib`` is what the loss adds on top of its inputs; ``total_mib`` (GPU only) also counts the
    features and their gradients: everything allocated at the peak.
    """
    import torch
    import torch.nn.functional as F

    from lipkit.losses import infonce_loss, sigmoid_loss, streaming_infonce_loss, streaming_sigmoid_loss

    def run(b: int) -> tuple[torch.Tensor, float, float]:
        torch.manual_seed(0)
        kw = {"device": device}
        image = F.normalize(torch.randn(b, dim, **kw), dim=-1).to(getattr(torch, dtype)).requires_grad_()
        text = F.normalize(torch.randn(b, dim, **kw), dim=-1).to(getattr(torch, dtype)).requires_grad_()
        scale = torch.tensor(14.3, **kw, requires_grad=True)
        bias = torch.tensor(-10.0, **kw, requires_grad=True)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        start = time.perf_counter()
        if loss_name == "infonce":
            loss = (
                infonce_loss(image, text, scale)
                if kind == "plain"
                else streaming_infonce_loss(image, text, scale, tile)
            )
        elif kind == "plain":
            loss = sigmoid_loss(image, text, scale, bias)
        else:
            loss = streaming_sigmoid_loss(image, text, scale, bias, tile)
        loss.backward()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return loss.detach(), base, time.perf_counter() - start

    if device.startswith("cuda"):
        run(min(batch, 2 * tile))  # warm-up: CUDA context, cuBLAS handles, kernels
    loss, base, seconds = run(batch)
    if device.startswith("cuda"):
        total = torch.cuda.max_memory_allocated() / 2**20
        peak = total
    else:
        total = None
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "loss_mib": peak - base, "total_mib": total, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8192)
    add_alias(parser, "--batch", "--batch-size", "batch_size", type=int)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--loss", choices=["infonce", "siglip"], default="infonce")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the features' dtype")
    parser.add_argument("--skip-plain", action="store_true", help="only the streaming loss (for batches too big)")
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    parser.add_argument("--child", choices=["plain", "streaming"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = measure(args.child, args.loss, args.batch_size, args.dim, args.tile, args.device, args.dtype)
        print(json.dumps(result))
        return
    kinds = ["streaming"] if args.skip_plain else ["plain", "streaming"]
    results = {}
    for kind in kinds:
        cmd = [sys.executable, __file__, "--child", kind, "--batch-size", str(args.batch_size), "--dim", str(args.dim)]
        cmd += ["--tile", str(args.tile), "--device", args.device, "--loss", args.loss, "--dtype", args.dtype]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    print(
        f"{args.loss} forward + backward, batch {args.batch_size}, dim {args.dim}, {args.dtype}, tile {args.tile}, "
        f"{args.device}"
    )
    for kind, r in results.items():
        total = f"  peak total {r['total_mib'] / 1024:.2f} GiB" if r["total_mib"] is not None else ""
        print(
            f"{kind:>9}: {r['seconds']:7.2f} s  peak loss memory {r['loss_mib']:9.1f} MiB{total}  loss {r['loss']:.6f}"
        )
    record = {"loss": args.loss, "batch": args.batch_size, "dim": args.dim}
    record |= {"dtype": args.dtype, "tile": args.tile, "device": args.device, "results": results}
    append_result(args.json, "loss_memory", record)
    if len(results) == 2:
        plain, stream = results["plain"], results["streaming"]
        print(
            f"memory plain/streaming: {plain['loss_mib'] / max(stream['loss_mib'], 1e-6):.1f}x; "
            f"time streaming/plain: {stream['seconds'] / plain['seconds']:.2f}x; "
            f"|loss difference| {abs(plain['loss'] - stream['loss']):.2e}"
        )


if __name__ == "__main__":
    main()

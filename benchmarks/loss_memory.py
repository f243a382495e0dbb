"""Contrastive loss memory and time: lipkit's streaming (tiled) losses vs the plain B x B loss.

Each measurement runs in a fresh process (forward + backward of the loss alone on random
L2-normalised features), so peak memory is that of the loss: ``torch.cuda.max_memory_allocated`` on a
GPU, the growth of the process's peak resident memory on a CPU. Prints both, and the ratios.

    python benchmarks/loss_memory.py --batch 8192                         # CPU
    python benchmarks/loss_memory.py --batch 262144 --device cuda --skip-plain
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def measure(kind: str, batch: int, dim: int, tile: int, device: str) -> dict[str, float]:
    """Forward + backward of one loss; returns seconds and peak memory (MiB)."""
    import torch
    import torch.nn.functional as F

    from lipkit.losses import infonce_loss, streaming_infonce_loss

    torch.manual_seed(0)
    image = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(batch, dim, device=device), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, device=device, requires_grad=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    start = time.perf_counter()
    loss = infonce_loss(image, text, scale) if kind == "plain" else streaming_infonce_loss(image, text, scale, tile)
    loss.backward()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": time.perf_counter() - start, "loss_mib": peak - base, "loss": float(loss)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-plain", action="store_true", help="only the streaming loss (for batches too big)")
    parser.add_argument("--child", choices=["plain", "streaming"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.batch, args.dim, args.tile, args.device)))
        return
    kinds = ["streaming"] if args.skip_plain else ["plain", "streaming"]
    results = {}
    for kind in kinds:
        cmd = [sys.executable, __file__, "--child", kind, "--batch", str(args.batch), "--dim", str(args.dim)]
        cmd += ["--tile", str(args.tile), "--device", args.device]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[kind] = json.loads(out.strip().splitlines()[-1])
    print(f"InfoNCE forward + backward, batch {args.batch}, dim {args.dim}, tile {args.tile}, {args.device}")
    for kind, r in results.items():
        print(f"{kind:>9}: {r['seconds']:7.2f} s  peak loss memory {r['loss_mib']:9.1f} MiB  loss {r['loss']:.6f}")
    if len(results) == 2:
        plain, stream = results["plain"], results["streaming"]
        print(
            f"memory plain/streaming: {plain['loss_mib'] / max(stream['loss_mib'], 1e-6):.1f}x; "
            f"time streaming/plain: {stream['seconds'] / plain['seconds']:.2f}x; "
            f"|loss difference| {abs(plain['loss'] - stream['loss']):.2e}"
        )


if __name__ == "__main__":
    main()

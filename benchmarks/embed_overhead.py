"""Overhead of the embedding job (``lipkit embed``) against the bare model forward on the same batches.

The items of ``--data`` (the first ``--items``) are decoded, transformed and tokenised once, as the
job's decoding stage does, and kept in memory. The *bare forward* then runs the model on those batches:
pixels and token ids to the device, ``encode_image`` and ``encode_text`` (normalised), vectors back to
the host. The *job* embeds the same items end to end into a fresh folder: listing, decoding in
``--workers`` processes, the model, thumbnails and the part files. Each is timed ``--rounds`` times,
taking turns; the best round of each is kept. The script prints items/s of both and the ratio
job/forward (goal: 0.9 or more when the decoding workers keep up with the model).

Run: ``PYTHONPATH=src python benchmarks/embed_overhead.py --model ViT-B-32 --items 2048 --workers 8 --device cuda``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import append_result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-32", help="model config (random weights; default: ViT-B-32)")
    p.add_argument("--data", default="tuxpaint:all", help="pair source spec (default: tuxpaint:all)")
    p.add_argument("--items", type=int, default=512, help="items to embed (default: 512)")
    p.add_argument("--batch-size", type=int, default=64, help="items per forward pass (default: 64)")
    p.add_argument("--workers", type=int, default=2, help="decoding processes of the job (default: 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    p.add_argument("--rounds", type=int, default=2, help="timed rounds of each (default: 2)")
    p.add_argument("--no-thumbnails", action="store_true", help="the job stores no thumbnails")
    p.add_argument("--json", metavar="FILE", help="append the result as one JSON line to FILE")
    return p.parse_args(argv)


def decoded_batches(encoder, data: str, items: int, batch_size: int) -> list[dict[str, np.ndarray]]:
    """The model inputs of the first ``items`` items, in the job's batches, decoded once."""
    from lipkit.index.items import list_items
    from lipkit.index.stages import Decoder

    listing = list_items(data, items)
    decoder = Decoder(listing.source, encoder.model.cfg, ("image", "text"), thumbnails=False)
    indexes = np.arange(len(listing))
    return [decoder({"index": indexes[i : i + batch_size]}) for i in range(0, len(indexes), batch_size)]


@torch.inference_mode()
def bare_forward(model, batches: list[dict[str, np.ndarray]], device: torch.device) -> float:
    """Seconds for the model alone on the batches: inputs to the device, both towers, vectors back."""
    from lipkit.models.factory import padding_trim_is_exact
    from lipkit.models.text_inputs import padded_length

    trim = padding_trim_is_exact(model.cfg)
    pad = getattr(model.cfg.text_config(), "pad_id", 0)
    start = time.perf_counter()
    for batch in batches:
        ids = torch.from_numpy(batch["ids"])
        if trim:
            ids = ids[:, : padded_length(ids != pad, 8)]
        images = model.encode_image(torch.from_numpy(batch["pixels"]).to(device), normalize=True)
        texts = model.encode_text(ids.to(device), normalize=True)
        images.float().cpu(), texts.float().cpu()
    return time.perf_counter() - start


def job(encoder, args: argparse.Namespace, folder: Path) -> float:
    """Seconds for the embedding job over the same items into a fresh folder."""
    from lipkit.index.embed import EmbedOptions, embed_collection
    from lipkit.index.runners import LocalRunner

    options = EmbedOptions(
        args.data, folder, batch_size=args.batch_size, limit=args.items, progress=False,
        thumbnails=not args.no_thumbnails,
    )  # fmt: skip
    start = time.perf_counter()
    summary = embed_collection(encoder, options, LocalRunner(encoder.device, args.workers))
    seconds = time.perf_counter() - start
    if summary.embedded != args.items:
        raise SystemExit(f"the job embedded {summary.embedded} of {args.items} items")
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    from lipkit.index.encoder import QueryEncoder
    from lipkit.models import create_model
    from lipkit.utils import resolve_device

    args = parse_args(argv)
    torch.manual_seed(0)
    device = resolve_device(args.device)
    encoder = QueryEncoder(create_model(args.model), device)
    batches = decoded_batches(encoder, args.data, args.items, args.batch_size)
    args.items = sum(len(b["index"]) for b in batches)
    bare_forward(encoder.model, batches[:1], device)  # warm-up: kernels, allocator
    forward_s, job_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            forward_s.append(bare_forward(encoder.model, batches, device))
            job_s.append(job(encoder, args, Path(tmp) / f"round{r}"))
    rates = {"forward": args.items / min(forward_s), "job": args.items / min(job_s)}
    ratio = rates["job"] / rates["forward"]
    setup = f"batch {args.batch_size}, {args.workers} workers"
    print(f"{args.model} on {device}, {args.items} items of {args.data}, {setup}")
    print(f"  bare forward {rates['forward']:9.1f} items/s")
    print(f"  embed job    {rates['job']:9.1f} items/s")
    print(f"  ratio job/forward {ratio:.2f} (goal >= 0.9)")
    row = {"model": args.model, "device": str(device), "items": args.items, "batch_size": args.batch_size}
    append_result(args.json, "embed_overhead", {**row, "workers": args.workers, "items_per_s": rates, "ratio": ratio})


if __name__ == "__main__":
    main()

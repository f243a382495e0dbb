"""Large effective batches on one device: lipkit's micro-batched (GradCache) training step.

Runs lipkit's own training step (``lipkit.train.loop.train_step`` with ``accum_micro_batch``) on one
synthetic batch of ``--batch-size`` samples that stays in pinned host memory, micro-batch by micro-batch,
and prints the seconds per optimizer step, samples/s, peak device memory, and the same step's
throughput at batch ``--micro`` without accumulation, so the price of the big batch is visible.

    python benchmarks/accumulation.py --model tiny --batch 512 --micro 64            # CPU smoke run
    python benchmarks/accumulation.py --model ViT-B-16 --batch-size 65536 --micro 512 --device cuda --precision bf16

``--count-memory`` runs two such steps on fake tensors instead (any machine; nothing is allocated or
computed) and prints their peak tensor memory by kind, as ``benchmarks/train_memory.py`` counts it,
with the batch in host memory set apart: what the device would have to hold.

    python benchmarks/accumulation.py --model ViT-B-16 --batch-size 65536 --micro 512 --precision bf16 --count-memory
"""

from __future__ import annotations

import argparse
import time

import torch

from lipkit.cli.options import add_alias
from lipkit.train import loop
from lipkit.train.config import resolve_config
from lipkit.train.distributed import DistEnv
from results import append_result


def synthetic_batch(cfg, batch: int, pool: int, pin: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` images made of a pool of ``pool`` distinct random ones (filling 36.8 GiB with randn is slow)."""
    from lipkit.models import get_model_config

    model_cfg = get_model_config(cfg.model)
    size, text = model_cfg.vision_config().image_size, model_cfg.text_config()
    gen = torch.Generator().manual_seed(seed)
    images = torch.empty((batch, 3, size, size), pin_memory=pin)
    distinct = torch.randn((min(pool, batch), 3, size, size), generator=gen)
    for start in range(0, batch, distinct.shape[0]):
        stop = min(start + distinct.shape[0], batch)
        images[start:stop] = distinct[: stop - start]
    tokens = torch.randint(1, text.vocab_size - 1, (batch, text.context_length), generator=gen)
    tokens[:, -1] = text.vocab_size - 1  # end of text
    return images, (tokens.pin_memory() if pin else tokens)


def timed_step(state, cfg, images, tokens, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    record = loop.train_step(state, cfg, images, tokens)
    if not torch.isfinite(record).all():  # reads back: the step is over
        raise RuntimeError(f"the step gave a non-finite loss or gradient norm: {record.tolist()}")
    return time.perf_counter() - start


def count_memory(cfg, batch: int) -> dict[str, float]:
    """Peak memory of two micro-batched steps on fake tensors, in GiB by kind, plus ``device``.

    ``device`` is the total without the host batch, plus one micro-batch of images and tokens (on a
    CPU the step's micro-batches are views of the batch; on a GPU each is copied over).
    """
    from lipkit.models import create_model
    from lipkit.train.optim import build_optimizer
    from train_memory import count_peak
    from train_throughput import synthetic_inputs

    def setup():
        # As loop.build_state, but built in place: moving fake parameters with .to() is not supported.
        model = create_model(cfg.model).train()
        optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
        state = loop.TrainState(model, loop.loss_for(cfg, DistEnv()), optimizer, DistEnv(), model)
        images, tokens = synthetic_inputs(cfg.model, batch)
        return [model, optimizer, images, tokens], lambda: loop.train_step(state, cfg, images, tokens)

    peak = count_peak(setup)
    host = peak["inputs"]
    peak["device"] = peak["total"] - host + host * cfg.accum_micro_batch / batch
    return peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--batch-size", type=int, default=512, help="effective batch (one optimizer step)")
    add_alias(parser, "--batch", "--batch-size", "batch_size", type=int)
    parser.add_argument("--micro", type=int, default=64, help="samples per forward pass")
    parser.add_argument("--precision", choices=["fp32", "bf16", "bf16-pure"], default="fp32")
    parser.add_argument("--loss", default="infonce-streaming", help="lipkit loss (the plain B x B one is large)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", default="null", help="the trainer's compile setting (default: eager)")
    parser.add_argument("--pool", type=int, default=4096, help="distinct synthetic images in the batch")
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps at the full batch")
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    parser.add_argument("--count-memory", action="store_true", help="count the peak on fake tensors; no timing")
    args = parser.parse_args()

    device = torch.device(args.device)
    overrides = [
        f"model={args.model}",
        f"precision={args.precision}",
        f"loss={args.loss}",
        f"device={args.device}",
        f"compile={args.compile}",
        f"accum_micro_batch={args.micro}",
        "optim.warmup_steps=0",
    ]
    cfg = resolve_config("tiny-synthetic", overrides=overrides)
    if args.count_memory:
        peak = count_memory(cfg, args.batch_size)
        print(
            f"{args.model}, effective batch {args.batch_size} in micro-batches of {args.micro}, {args.precision}, "
            f"{args.loss}: peak tensor memory of a step (GiB), counted on fake tensors, torch {torch.__version__}"
        )
        for kind, gib in peak.items():
            print(f"{kind:>16}: {gib:7.2f}")
        append_result(args.json, "accumulation_memory", {**vars(args), "peak_gib": peak})
        return
    state = loop.build_state(cfg, DistEnv(), device)
    images, tokens = synthetic_batch(cfg, args.batch_size, args.pool, pin=device.type == "cuda")
    host_gib = images.numel() * images.element_size() / 2**30

    small_images, small_tokens = images[: args.micro], tokens[: args.micro]
    plain = resolve_config("tiny-synthetic", overrides=[*overrides, "accum_micro_batch=null"])
    for _ in range(2):  # warm-up (kernels, optimizer state), both paths
        timed_step(state, plain, small_images, small_tokens, device)
        timed_step(state, cfg, images[: 2 * args.micro], tokens[: 2 * args.micro], device)
    plain_s = min(timed_step(state, plain, small_images, small_tokens, device) for _ in range(3))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed_step(state, cfg, images, tokens, device) for _ in range(args.steps)]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    step_s = min(seconds)
    result = {
        "model": args.model,
        "effective_batch": args.batch_size,
        "micro_batch": args.micro,
        "precision": args.precision,
        "loss": args.loss,
        "compile": args.compile,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seconds_per_step": step_s,
        "samples_per_s": args.batch_size / step_s,
        "plain_micro_batch_samples_per_s": args.micro / plain_s,
        "peak_device_gib": peak,
        "host_batch_gib": host_gib,
    }
    print(
        f"{args.model}, effective batch {args.batch_size} in micro-batches of {args.micro}, {args.precision}, "
        f"{args.loss}, {result['device']}, torch {torch.__version__}"
    )
    print(f"  one optimizer step: {step_s:.2f} s, {result['samples_per_s']:.1f} samples/s")
    print(
        f"  plain steps at batch {args.micro}: {result['plain_micro_batch_samples_per_s']:.1f} samples/s "
        f"(accumulated / plain: {result['samples_per_s'] / result['plain_micro_batch_samples_per_s']:.2f}x)"
    )
    print(f"  batch in host memory: {host_gib:.1f} GiB" + (f"; peak device memory {peak:.2f} GiB" if peak else ""))
    append_result(args.json, "accumulation", result)


if __name__ == "__main__":
    main()

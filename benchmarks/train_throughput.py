"""Training throughput: lipkit vs OpenCLIP on the same config, side by side in one run.

Both libraries build the same architecture (ViT image tower + CLIP text transformer) with the same
widths, depths, batch, precision and synthetic data; each step is forward + InfoNCE loss + backward
+ AdamW, the same optimizer on both sides: fused where lipkit's trainer fuses it (CUDA, CPU), or
PyTorch's default with --unfused. Rounds alternate between the two so that machine noise hits both alike.
Prints samples/s, peak GPU memory, model FLOPs utilisation and the lipkit/OpenCLIP ratios. Model FLOPs
are those of the full computation (OpenCLIP's count); lipkit may execute fewer (it skips the last
block's work for tokens that pooling discards), and prints that count too.

    python benchmarks/train_throughput.py                 # the `tiny` config, batch 64, fp32, CPU
    python benchmarks/train_throughput.py --model ViT-B-32 --batch-size 1024 --device cuda --precision bf16
    python benchmarks/train_throughput.py --model ViT-B-16 --batch-size 512 --device cuda --precision bf16 --compile

``--captions SOURCE`` (e.g. ``tuxpaint:train``, or a text file with one caption per line) replaces the
random full-length tokens with real captions, cycled to fill the batch. Each side then gets what its
own loader would give it: OpenCLIP the captions padded to the context length, lipkit the same ids
without the padding columns that every caption of the batch shares (exact for causal text towers).

``--trainer`` adds a third side: lipkit's own training step (``lipkit.train.loop.train_step``, as
``lipkit train`` runs it, with its defaults: gradient clipping, the learning-rate schedule, the step
record kept on the device; ``--compile`` gives it ``compile=inductor``), so the cost of everything the
trainer does beyond model + loss + optimizer shows too.

``--json FILE`` appends the figures as one JSON line; ``--profile N`` then profiles a few steps of each
side and prints its N most expensive kernels (what limits the step).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

import lipkit
from lipkit.losses import create_loss
from lipkit.models import get_model_config
from lipkit.train.optim import FUSED_DEVICES
from results import append_result

TRAINER = "lipkit train_step"  # the --trainer side


def openclip_model(name: str) -> torch.nn.Module:
    """Build OpenCLIP's CLIP with the architecture of lipkit config ``name``."""
    import open_clip

    cfg = get_model_config(name)
    v, t = cfg.vision_config(), cfg.text_config()
    vision = {"image_size": v.image_size, "patch_size": v.patch_size, "width": v.width, "layers": v.layers}
    vision["head_width"] = v.width // v.heads
    text = {"context_length": t.context_length, "vocab_size": t.vocab_size, "width": t.width, "heads": t.heads}
    text["layers"] = t.layers
    quick = v.act == "quick_gelu"
    return open_clip.CLIP(cfg.embed_dim, vision, text, quick_gelu=quick)


def lipkit_step(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    loss_fn = create_loss("infonce")
    return lambda images, tokens: loss_fn(model(images, tokens))


def openclip_step(model: torch.nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from open_clip.loss import ClipLoss

    loss_fn = ClipLoss()

    def step(images: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        image_features, text_features, logit_scale = model(images, tokens)
        return loss_fn(image_features, text_features, logit_scale)

    return step


def synthetic_inputs(name: str, batch: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of random images and full-length token ids (ending in end-of-text) for model config ``name``."""
    cfg = get_model_config(name)
    size, ctx = cfg.vision_config().image_size, cfg.text_config().context_length
    images = torch.randn(batch, 3, size, size, device=device)
    tokens = torch.randint(1, 49406, (batch, ctx), device=device)
    tokens[:, -1] = 49407
    return images, tokens


def make_runner(
    model: torch.nn.Module, loss_step, device: torch.device, precision: str, compile: bool = False, fused: bool = True
):
    model.to(device).train()
    if compile:
        loss_step = torch.compile(loss_step)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused and device.type in FUSED_DEVICES)
    dtype = torch.bfloat16 if precision == "bf16" else None

    def run(images: torch.Tensor, tokens: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = loss_step(images, tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def trainer_runner(model: str, device: torch.device, precision: str, compile: bool):
    """lipkit's whole training step on one batch, with the trainer's defaults for ``model``."""
    from lipkit.train import loop
    from lipkit.train.config import resolve_config
    from lipkit.train.distributed import DistEnv

    overrides = [f"model={model}", f"precision={precision}", f"device={device.type}", "loss=infonce"]
    overrides += [f"compile={'inductor' if compile else 'null'}", "optim.warmup_steps=0", "optim.lr=1e-4"]
    cfg = resolve_config("tiny-synthetic", overrides=overrides)
    state = loop.build_state(cfg, DistEnv(), device)
    return lambda images, tokens: loop.train_step(state, cfg, images, tokens)


def step_flops(run, images: torch.Tensor, tokens: torch.Tensor) -> float:
    """FLOPs of one training step (forward + backward), counted by PyTorch's FLOP counter."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run(images, tokens)
    return float(counter.get_total_flops())


def time_steps(run, images: torch.Tensor, tokens: torch.Tensor, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        run(images, tokens)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="lipkit model config (default: tiny)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--unfused", action="store_true", help="PyTorch's default AdamW, not the fused one (both)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="device peak for MFU (H100 bf16: 989)")
    parser.add_argument("--captions", help="real captions: a lipkit data source or a file, one per line")
    parser.add_argument("--trainer", action="store_true", help="also time lipkit's whole training step")
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print each side's N costliest ops")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    images, tokens = synthetic_inputs(args.model, args.batch_size, device)
    ours_tokens = tokens
    if args.captions:
        tokens, ours_tokens = caption_tokens(args.captions, args.model, args.batch_size)
        tokens, ours_tokens = tokens.to(device), ours_tokens.to(device)
        lengths = f"{tokens.shape[1]} text positions for OpenCLIP, {ours_tokens.shape[1]} for lipkit"
        print(f"captions from {args.captions}: {lengths}")

    ours = lipkit.create_model(args.model)
    theirs = openclip_model(args.model)
    fused = not args.unfused
    runners = {
        "lipkit": make_runner(ours, lipkit_step(ours), device, args.precision, args.compile, fused),
        "openclip": make_runner(theirs, openclip_step(theirs), device, args.precision, args.compile, fused),
    }
    batch_tokens = {"lipkit": ours_tokens, "openclip": tokens}
    if args.trainer:
        runners[TRAINER] = trainer_runner(args.model, device, args.precision, args.compile)
        batch_tokens[TRAINER] = ours_tokens
    flops = {name: step_flops(run, images, batch_tokens[name]) for name, run in runners.items()}
    peak = {}
    for name, run in runners.items():  # warm-up (and compilation), then peak memory of a few steps
        time_steps(run, images, batch_tokens[name], 3, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            time_steps(run, images, batch_tokens[name], 2, device)
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            seconds = time_steps(run, images, batch_tokens[name], args.steps, device)
            rates[name].append(args.steps * args.batch_size / seconds)
    results = report(args, ours, device, flops, rates, peak)
    results["captions"] = args.captions
    results["text_positions"] = {name: t.shape[1] for name, t in batch_tokens.items()}
    append_result(args.json, "train_throughput", results)
    if args.profile:
        for name, run in runners.items():
            print(f"--- {name}: the {args.profile} costliest ops over 3 steps ---")
            print(profile_table(run, images, batch_tokens[name], device, args.profile))


def caption_tokens(spec: str, model: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(full-length tokens, lipkit's training tokens) of ``batch`` real captions, cycled if too few."""
    from pathlib import Path

    from lipkit.models.factory import batch_tokenizer

    if Path(spec).is_file():
        captions = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
    else:
        from lipkit.data.spec import open_mixture

        source = open_mixture(spec).concatenated()
        captions = [source.caption(i) for i in range(len(source))]
    captions = [captions[i % len(captions)] for i in range(batch)]
    return lipkit.get_tokenizer(model)(captions), batch_tokenizer(model)(captions)


def profile_table(run, images: torch.Tensor, tokens: torch.Tensor, device: torch.device, rows: int) -> str:
    """The ``rows`` ops that take the most device time (self time) over three steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        time_steps(run, images, tokens, 3, device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=60)


def report(
    args, model, device, counts: dict[str, float], rates: dict[str, list[float]], peak: dict[str, float]
) -> dict:
    """Print the side-by-side table and the ratios; return them as a dict."""
    med = {name: statistics.median(r) for name, r in rates.items()}
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"model {args.model} ({params:.1f}M params), batch {args.batch_size}, {args.precision}, {device}, "
        f"compile={args.compile}, AdamW {'unfused' if args.unfused else 'fused'}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    flops = counts["openclip"]  # the full computation: the same model FLOPs for both sides
    print(
        f"model FLOPs per step (forward + backward): {flops / 1e12:.4f} TFLOP; "
        f"executed by lipkit: {counts['lipkit'] / 1e12:.4f} TFLOP"
    )
    for name, value in med.items():
        tflops = flops * value / args.batch_size / 1e12
        mem = f"  peak {peak[name]:.1f} GiB" if name in peak else ""
        mfu = f"  MFU {100 * tflops / args.peak_tflops:.1f}%" if device.type == "cuda" else ""
        print(f"{name:>17}: {value:8.1f} samples/s  {tflops:7.3f} TFLOP/s{mfu}{mem}")
        print(f"{'':>19}rounds: {', '.join(f'{r:.1f}' for r in rates[name])}")
    ratio = f"ratio lipkit/openclip: {med['lipkit'] / med['openclip']:.2f}x samples/s"
    if peak:
        ratio += f", {peak['lipkit'] / peak['openclip']:.2f}x peak memory"
    print(ratio)
    if TRAINER in med:
        print(f"ratio {TRAINER}/openclip: {med[TRAINER] / med['openclip']:.2f}x samples/s")
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {
        "model": args.model,
        "batch": args.batch_size,
        "precision": args.precision,
        "compile": args.compile,
        "fused_adamw": not args.unfused,
        "device": device_name,
        "torch": torch.__version__,
        "model_tflop_per_step": flops / 1e12,
        "lipkit_executed_tflop_per_step": counts["lipkit"] / 1e12,
        "samples_per_s": med,
        "rounds": rates,
        "peak_gib": peak,
        "mfu": {n: flops * v / args.batch_size / 1e12 / args.peak_tflops for n, v in med.items()}
        if device.type == "cuda"
        else {},
        "ratio_samples_per_s": med["lipkit"] / med["openclip"],
        "ratio_peak_memory": peak["lipkit"] / peak["openclip"] if peak else None,
        "ratio_trainer_samples_per_s": med[TRAINER] / med["openclip"] if TRAINER in med else None,
    }


if __name__ == "__main__":
    main()

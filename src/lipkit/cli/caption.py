"""``lipkit caption``: write captions for images with a CoCa model."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lipkit.cli.options import add_quiet

if TYPE_CHECKING:
    from lipkit.models import DualEncoder

DESCRIPTION = """\
Write a caption for each image with a CoCa model (a model with a captioning decoder: coca_ViT-B-32,
coca_ViT-L-14... or one trained with lipkit). Prints one line per image: its path, a tab, its caption
(--json: one JSON object per line). Files that are not readable images are reported and skipped.

Captions come from beam search by default; --method greedy takes the most probable token at each
step, top_k and top_p sample (set --seed to repeat a sample)."""

EPILOG = """\
examples:
  lipkit caption runs/my-coca photos/
  lipkit caption coca.pt --model coca_ViT-B-32 cat.jpg dog.png --method greedy
  lipkit caption laion2b_s13b_b90k --model coca_ViT-B-32 photos/ --num-beams 4 --json
  lipkit caption runs/my-coca photos/ --method top_p --top-p 0.9 --temperature 0.8 --seed 1"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "caption",
        help="write captions for images with a CoCa model",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        metavar="MODEL_OR_RUN",
        help="a run directory (its newest checkpoint), a lipkit checkpoint, OpenCLIP weights with --model, or one "
        "of OpenCLIP's pretrained tags of --model whose file is on this machine",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files, or folders searched for them")
    p.add_argument("--model", help="model config name (default: the one recorded in the checkpoint)")
    p.add_argument(
        "--method",
        choices=("beam", "greedy", "top_k", "top_p"),
        default="beam",
        help="beam search, greedy, or top-k / nucleus (top-p) sampling (default: beam)",
    )
    p.add_argument("--max-length", type=int, default=30, help="longest caption in tokens (default: 30)")
    p.add_argument("--min-length", type=int, default=5, help="no end token before this many tokens (default: 5)")
    p.add_argument("--num-beams", type=int, default=6, help="beams per image for beam search (default: 6)")
    p.add_argument("--top-k", type=int, default=50, help="top_k: sample among the k likeliest tokens (default: 50)")
    p.add_argument(
        "--top-p",
        type=float,
        default=0.9,
        help="top_p: sample among the likeliest tokens holding this mass (default: 0.9)",
    )
    p.add_argument("--temperature", type=float, default=1.0, help="divides the logits when sampling (default: 1)")
    p.add_argument(
        "--repetition-penalty", type=float, default=1.0, help="penalise tokens already written; 1 = none (default: 1)"
    )
    p.add_argument(
        "--length-penalty",
        type=float,
        default=1.0,
        help="beam score: log-prob / length**this (default: 1)",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling (default: 0)")
    p.add_argument("--batch-size", type=int, default=16, help="images per batch (default: 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda... (default: auto)")
    p.add_argument("--tokenizer-path", help="local tokenizer file or folder, for models with a Hugging Face tokenizer")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    add_quiet(p)
    p.set_defaults(run=run_caption)


def run_caption(args: argparse.Namespace) -> int:
    import json
    import sys

    from tqdm.auto import tqdm

    from lipkit.eval.captioner import Captioner, CaptionSettings, image_files
    from lipkit.utils import resolve_device

    files = image_files(args.images)
    settings = CaptionSettings(
        method=args.method,
        max_length=args.max_length,
        min_length=args.min_length,
        num_beams=args.num_beams,
        top_k=args.top_k,
        top_p=args.top_p,
        temperature=args.temperature,
        repetition_penalty=args.repetition_penalty,
        length_penalty=args.length_penalty,
        seed=args.seed,
    )
    device = resolve_device(args.device)
    model = _load(args.checkpoint, args.model).to(device)
    overrides = {"tokenizer_path": args.tokenizer_path} if args.tokenizer_path else {}
    captioner = Captioner.from_model(model, settings, **overrides)
    failed = 0
    bar = tqdm(total=len(files), unit="image", disable=args.quiet or len(files) <= args.batch_size, file=sys.stderr)
    for result in captioner.caption_files(files, args.batch_size):
        bar.update(1)
        if result.caption is None:
            failed += 1
            bar.write(f"skipped {result.path}: {result.error}", file=sys.stderr)
            continue
        if args.json:
            print(json.dumps({"path": str(result.path), "caption": result.caption}, ensure_ascii=False))
        else:
            print(f"{result.path}\t{result.caption}")
    bar.close()
    if failed:
        print(f"{failed} of {len(files)} files were not readable images", file=sys.stderr)
    return 1 if failed == len(files) else 0


def _load(checkpoint: str, model: str | None) -> DualEncoder:
    """The model a run, a weights file or (with ``--model``) a pretrained tag names."""
    from pathlib import Path

    from lipkit.models import create_model
    from lipkit.train.checkpoint import load_trained

    if model is not None and not Path(checkpoint).exists():  # an OpenCLIP pretrained tag, resolved locally
        return create_model(model, pretrained=checkpoint)
    return load_trained(checkpoint, model)[0]

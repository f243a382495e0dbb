"""``lipkit eval``: evaluate a model (image-text retrieval so far)."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a model",
        description="Evaluate a model. Tasks: `retrieval` (image->text and text->image Recall@1/5/10 "
        "and median rank on a pair source).",
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    r = tasks.add_parser(
        "retrieval",
        help="image-text retrieval Recall@k",
        description="Image->text and text->image Recall@1/5/10 and median rank of a model on held-out pairs.",
    )
    r.add_argument(
        "checkpoint",
        help="a run directory (its newest checkpoint is used), a lipkit checkpoint, or OpenCLIP/OpenAI "
        "weights together with --model",
    )
    r.add_argument("--model", help="model config name (default: the one recorded in the checkpoint)")
    r.add_argument("--data", default="tuxpaint:test", help="pair source spec (default: tuxpaint:test)")
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda...")
    r.add_argument("--out", help="also write the metrics to this JSON file")
    r.set_defaults(run=run_retrieval)


def run_retrieval(args: argparse.Namespace) -> int:
    from lipkit.data.sources import open_source
    from lipkit.eval.embed import embed_pairs
    from lipkit.eval.retrieval import retrieval_metrics
    from lipkit.models import create_model
    from lipkit.train.checkpoint import recorded_model_config, resolve_weights
    from lipkit.utils import atomic_write_text, resolve_device

    weights = resolve_weights(args.checkpoint)
    model = create_model(args.model or recorded_model_config(weights), pretrained=str(weights))
    source = open_source(args.data)
    images, texts = embed_pairs(model, source, args.batch_size, device=resolve_device(args.device))
    metrics = retrieval_metrics(images, texts)
    result = {"task": "retrieval", "data": args.data, "checkpoint": str(weights), "n": len(source), **metrics}
    chance = 100.0 / len(source)
    print(f"retrieval on {args.data}: {len(source)} pairs (chance R@1 {chance:.1f}%)")
    for direction in ("image_to_text", "text_to_image"):
        recalls = "  ".join(f"R@{k} {metrics[f'{direction}_R@{k}']:5.1f}" for k in (1, 5, 10))
        print(f"  {direction.replace('_', ' '):<14} {recalls}  median rank {metrics[f'{direction}_median_rank']:.0f}")
    if args.out:
        atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    return 0

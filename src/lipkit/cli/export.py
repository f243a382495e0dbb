"""``lipkit export``: write a lipkit checkpoint in OpenCLIP's state-dict layout."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export weights to OpenCLIP's layout",
        description="Load a checkpoint (lipkit, OpenCLIP or OpenAI) into a lipkit model and write it as an "
        "OpenCLIP state dict that open_clip.create_model(NAME) loads with load_state_dict(strict=True).",
    )
    p.add_argument("checkpoint", help="weights to read")
    p.add_argument("--model", help="model config name; default: the one recorded in a lipkit checkpoint")
    p.add_argument("--out", required=True, metavar="FILE", help="output file (written atomically)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lipkit.models import create_model
    from lipkit.models.convert import export_openclip
    from lipkit.train.checkpoint import recorded_model_config
    from lipkit.utils import check_writable

    check_writable(Path(args.out))  # refused before the model is loaded, not after
    model_cfg = args.model or recorded_model_config(args.checkpoint)
    model = create_model(model_cfg, pretrained=args.checkpoint)
    export_openclip(model, args.out)
    print(f"wrote {args.out}")
    return 0

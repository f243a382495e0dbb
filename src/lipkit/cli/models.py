"""``lipkit models``: list the model configs."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the model configs",
        description="List the built-in model configs (architectures as JSON data), or show one of them.",
    )
    p.add_argument("name", nargs="?", help="show this config in full, as JSON")
    p.add_argument("--params", action="store_true", help="also count parameters (builds each model on the meta device)")
    p.set_defaults(run=run)


def _param_count(name: str) -> str:
    import torch

    from lipkit.models import create_model

    with torch.device("meta"):
        model = create_model(name)
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def run(args: argparse.Namespace) -> int:
    from lipkit.config import to_dict
    from lipkit.models.config import get_model_config, list_models
    from lipkit.utils import strict_json

    if args.name:
        print(strict_json(to_dict(get_model_config(args.name)), indent=2))
        return 0
    print(f"{'name':<22} {'embed':>5}  {'image tower':<24} {'text tower':<24}" + ("  params" if args.params else ""))
    for name in list_models():
        cfg = get_model_config(name)
        v, t = cfg.vision_config(), cfg.text_config()
        vision = f"{cfg.vision['type']} {getattr(v, 'image_size', '')}px" + (
            f" /{v.patch_size} w{v.width} x{v.layers}" if cfg.vision["type"] == "vit" else f" {v.name}"
        )
        text = f"{cfg.text['type']} ctx{t.context_length}" + (
            f" w{t.width} x{t.layers}" if cfg.text["type"] == "transformer" else ""
        )
        extra = f"  {_param_count(name)}" if args.params else ""
        print(f"{name:<22} {cfg.embed_dim:>5}  {vision:<24} {text:<24}{extra}")
    return 0

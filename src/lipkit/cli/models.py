"""``lipkit models``: list the model configs, grouped by family."""

from __future__ import annotations

import argparse
import textwrap
from typing import Any


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the model configs",
        description="List the built-in model configs (architectures as JSON data: lipkit's own and every "
        "OpenCLIP config), grouped by family, or show one of them. Families lipkit cannot build yet are "
        "listed with the reason.",
    )
    p.add_argument("name", nargs="?", help="show this config in full, as JSON")
    p.add_argument("--family", help="only this family (e.g. siglip2, openai-resnet)")
    p.add_argument("--params", action="store_true", help="also count parameters (builds each model on the meta device)")
    p.set_defaults(run=run)


def _param_count(name: str) -> str:
    import torch

    from lipkit.models import create_model

    with torch.device("meta"):
        model = create_model(name)
    return f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M"


def _describe_vision(vision: dict[str, Any], v: Any) -> str:
    size = f"{vision['type']} {getattr(v, 'image_size', '')}px"
    if vision["type"] == "vit":
        return f"{size} /{v.patch_size} w{v.width} x{v.layers}"
    if vision["type"] == "resnet":
        return f"{size} w{v.width} {'-'.join(str(n) for n in v.layers)}"
    return f"{size} {v.name}"


def _describe_text(text: dict[str, Any], t: Any) -> str:
    out = f"{text['type']} ctx{t.context_length}"
    if text["type"] == "hf":  # the model folder: a path's last part
        return f"{out} {t.path.rstrip('/').rsplit('/', 1)[-1]}"
    return out + (f" w{t.width} x{t.layers}" if text["type"] == "transformer" else "")


def _families(names: list[str]) -> dict[str, list[str]]:
    from lipkit.models.config import model_family

    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(model_family(name) or "lipkit", []).append(name)
    return dict(sorted(groups.items()))


def _print_family(family: str, names: list[str], params: bool) -> None:
    from lipkit.models.config import get_model_config, unsupported_reason

    if unsupported_reason(names[0]) is not None:  # a family lipkit cannot build yet: its names, by reason
        print(f"\n{family} ({len(names)}, cannot be built yet)")
        by_reason: dict[str, list[str]] = {}
        for name in names:
            by_reason.setdefault(unsupported_reason(name), []).append(name)
        for reason, group in by_reason.items():
            print(f"  {reason}:")
            print(textwrap.fill(", ".join(group), width=110, initial_indent="    ", subsequent_indent="    "))
        return
    print(f"\n{family} ({len(names)})")
    for name in names:
        cfg = get_model_config(name)
        vision = _describe_vision(cfg.vision, cfg.vision_config())
        text = _describe_text(cfg.text, cfg.text_config())
        extra = f"  {_param_count(name)}" if params else ""
        print(f"  {name:<32} {cfg.embed_dim:>5}  {vision:<28} {text:<24}{extra}")


def run(args: argparse.Namespace) -> int:
    from lipkit.config import to_dict
    from lipkit.errors import UnknownNameError, suggest
    from lipkit.models.config import get_model_config, list_models
    from lipkit.utils import strict_json

    if args.name:
        print(strict_json(to_dict(get_model_config(args.name)), indent=2))
        return 0
    groups = _families(list_models())
    if args.family:
        if args.family not in groups:
            raise UnknownNameError(f"unknown model family {args.family!r}.{suggest(args.family, groups)}")
        groups = {args.family: groups[args.family]}
    buildable = len(list_models(buildable=True))
    print(f"{len(list_models())} model configs, {buildable} buildable; columns: name, embed, image tower, text tower")
    for family, names in groups.items():
        _print_family(family, names, args.params)
    return 0

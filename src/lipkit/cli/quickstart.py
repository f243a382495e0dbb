"""``lipkit quickstart``: train a real zero-shot model offline on built-in data, evaluate it, report."""

from __future__ import annotations

import argparse

DESCRIPTION = """\
Train and evaluate two models on lipkit's built-in data, offline, and write a report:

  lit   ImageNet EfficientNet-Lite0 + MiniLM towers, locked but for MiniLM's top layer
        (LiT); the heads and that layer train on cached trunk outputs, with three
        augmented views per training image (preset lit-quickstart)
  tiny  a small ViT + text transformer trained from scratch, as the baseline
        (preset tiny-quickstart)

Both train on the Tux Paint and emoji image-caption pairs and are evaluated on zero-shot
Fashion-MNIST and MNIST, retrieval on the held-out Tux Paint and emoji pairs, and few-shot
Fashion-MNIST. Finished steps are reused on a re-run. Each step is an ordinary lipkit
command: `lipkit train lit-quickstart`, `lipkit eval zeroshot ...`, `lipkit eval report ...`.
"""

EPILOG = """\
examples:
  lipkit quickstart
  lipkit quickstart --out runs/qs2 --set lit steps=300 optim.lr=5e-4
  lipkit quickstart --only lit --set lit 'data.train=/data/shards/{00000..00009}.tar'
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="train, evaluate and report a real zero-shot model on built-in data",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out", default="runs/quickstart", help="output folder (default: runs/quickstart)")
    p.add_argument(
        "--set",
        nargs="+",
        action="append",
        default=[],
        metavar=("RUN", "KEY=VALUE"),
        help="training overrides for one run (lit or tiny), e.g. --set lit steps=300",
    )
    p.add_argument("--only", choices=["lit", "tiny"], help="run only this model")
    p.add_argument("--max-eval-images", type=int, default=2000, help="images per labelled test set (default: 2000)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda... (default: auto)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lipkit.errors import ConfigError
    from lipkit.quickstart import QuickstartConfig, check_ready, run_quickstart

    check_ready()
    cfg = QuickstartConfig(out_dir=args.out, max_eval_images=args.max_eval_images, device=args.device)
    for run_name, *overrides in args.set:
        if run_name not in cfg.models:
            raise ConfigError(f"--set names a run {run_name!r}; the runs are {', '.join(cfg.models)}")
        cfg.overrides.setdefault(run_name, []).extend(overrides)
    if args.only:
        cfg.models = {args.only: cfg.models[args.only]}
    run_quickstart(cfg)
    return 0

"""``lipkit quickstart``: train a real zero-shot model offline on built-in data, evaluate it, report."""

from __future__ import annotations

import argparse

from lipkit.cli.options import add_alias, add_limit, add_quiet, add_set, warn_deprecated
from lipkit.errors import ConfigError, suggest

DESCRIPTION = """\
Train and evaluate two models on lipkit's built-in data, offline, and write a report:

  lit   ImageNet EfficientNet-Lite0 + MiniLM towers, locked but for MiniLM's top layer
        (LiT); the heads and that layer train on cached trunk outputs, with three
        augmented views per training image and the image tower's ImageNet classifier
        rows as extra pairs (preset lit-quickstart)
  tiny  a small ViT + text transformer trained from scratch, as the baseline
        (preset tiny-quickstart)

Both train on the Tux Paint and emoji image-caption pairs and are evaluated on zero-shot
Fashion-MNIST and MNIST, retrieval on the held-out Tux Paint and emoji pairs, and few-shot
Fashion-MNIST. Then the lit model embeds every Tux Paint and emoji image into a search
index (RUNS/search/index), and the last line is the command that serves it: `lipkit serve
--index ...`. Finished steps are reused on a re-run. Each step is an ordinary lipkit
command: `lipkit train lit-quickstart`, `lipkit eval zeroshot ...`, `lipkit embed ...`,
`lipkit index build ...`.
"""

EPILOG = """\
examples:
  lipkit quickstart
  lipkit quickstart --out-dir runs/qs2 --set lit.steps=300 lit.optim.lr=5e-4
  lipkit quickstart --only lit --set 'lit.data.train=/data/shards/{00000..00009}.tar'
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="train, evaluate and report a real zero-shot model on built-in data",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--out-dir", default="runs/quickstart", metavar="DIR", help="output folder (default: %(default)s)")
    add_alias(p, "--out", "--out-dir", "out_dir", metavar="DIR")
    add_set(p, "training overrides of one run (RUN: lit or tiny), e.g. --set lit.steps=300", "RUN.KEY=VALUE")
    p.add_argument("--only", choices=["lit", "tiny"], help="run only this model")
    p.add_argument("--no-search", action="store_true", help="build no search index")
    add_limit(p, "images of each labelled test set", old="--max-eval-images", default=2000)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda... (default: auto)")
    add_quiet(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lipkit.quickstart import QuickstartConfig, check_ready, run_quickstart

    cfg = QuickstartConfig(out_dir=args.out_dir, max_eval_images=args.limit, device=args.device)
    for run_name, override in run_overrides(args.set, tuple(cfg.models)):
        cfg.overrides.setdefault(run_name, []).append(override)
    check_ready()
    if args.quiet:
        for run_name in cfg.models:
            cfg.overrides.setdefault(run_name, []).append("progress=false")
    if args.only:
        cfg.models = {args.only: cfg.models[args.only]}
    if args.no_search or cfg.search not in cfg.models:
        cfg.search = ""
    run_quickstart(cfg)
    return 0


def run_overrides(items: list[str], runs: tuple[str, ...]) -> list[tuple[str, str]]:
    """Split ``--set`` values into (run, ``key=value``) pairs.

    ``RUN.KEY=VALUE`` names its run. The old form ``--set RUN KEY=VALUE ...`` (a run name on its own,
    then overrides for it) still works, with a deprecation notice.

    Raises:
        ConfigError: A value that names no run, or a bare word that is not a run.
    """
    pairs, current = [], None
    for item in items:
        head, _, rest = item.partition(".")
        if "=" not in item:
            if item not in runs:
                raise ConfigError(f"--set names a run {item!r}; the runs are {', '.join(runs)}.{suggest(item, runs)}")
            warn_deprecated("lipkit quickstart", f"--set {item} KEY=VALUE", f"--set {item}.KEY=VALUE")
            current = item
        elif head in runs:
            pairs.append((head, rest))
        elif current is not None:
            pairs.append((current, item))
        else:
            raise ConfigError(f"--set takes RUN.KEY=VALUE with RUN one of {', '.join(runs)}; got {item!r}")
    return pairs

"""``lipkit train``: train a dual encoder from a preset, a YAML file and --set key=value overrides."""

from __future__ import annotations

import argparse

from lipkit.cli.options import add_quiet, add_seed, add_set

HELP = """\
Train a CLIP/SigLIP dual encoder.

The configuration is built in layers: defaults < PRESET < --config FILE < --set overrides.
The resolved configuration is saved as RUN_DIR/config.yaml; pass it back with --config to
reproduce a run. Keys are dotted paths: --set steps=500 optim.lr=1e-3 data.batch_size=128
model=ViT-B-32 precision=bf16 loss=siglip resume=latest. Overrides may also follow the preset
without --set (lipkit train tiny-tuxpaint steps=500). --seed N, --out-dir DIR and --quiet are
short for --set seed=N, out_dir=DIR and progress=false.

Scale and speed (docs/guide.md has every key):
  loss=infonce|siglip              CLIP softmax / SigLIP sigmoid; under torchrun over the global batch
  loss=infonce-streaming|siglip-streaming
                                   never hold the B x B logits (loss_options.tile=4096); across
                                   processes siglip-streaming uses SigLIP's ring exchange
  accum_micro_batch=N              exact big-batch gradients, N samples per forward pass
  precision=fp32|bf16|bf16-pure    grad_checkpointing=true   model_overrides.vision.patch_dropout=0.5
  compile=auto|null|inductor       auto: torch.compile on CUDA, eager on CPU
  fsdp=true                        under torchrun, shard the model instead of replicating it
  torchrun --nproc-per-node 8 -m lipkit.cli.main train PRESET --set ...   one process per GPU
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a dual encoder",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("preset", nargs="?", help="a named preset (see --list-presets)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides (the same as --set)")
    add_set(p, "config overrides, e.g. --set steps=500 optim.lr=1e-3")
    p.add_argument("--config", "-c", metavar="FILE", help="a YAML config file (e.g. a saved RUN_DIR/config.yaml)")
    p.add_argument("--out-dir", metavar="DIR", help="parent folder of the run directory (the config's out_dir)")
    add_seed(p, "initialisation, data order and augmentation (the config's seed)")
    add_quiet(p)
    p.add_argument("--list-presets", action="store_true", help="list the presets and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(run=run)


def overrides_of(args: argparse.Namespace) -> tuple[str | None, list[str]]:
    """The preset and the ``key=value`` overrides, in order: shortcut options, bare overrides, ``--set``."""
    preset, bare = args.preset, list(args.overrides)
    if preset and "=" in preset:  # no preset given, only overrides
        preset, bare = None, [preset, *bare]
    shortcuts = [f"out_dir={args.out_dir}"] if args.out_dir is not None else []
    shortcuts += [f"seed={args.seed}"] if args.seed is not None else []
    shortcuts += ["progress=false"] if args.quiet else []
    return preset, [*shortcuts, *bare, *args.set]


def run(args: argparse.Namespace) -> int:
    import yaml

    from lipkit.config import to_dict
    from lipkit.train.config import PRESETS, resolve_config

    if args.list_presets:
        for name in PRESETS.names():
            p = PRESETS.get(name)
            print(f"{name:<18} model={p.get('model')} steps={p.get('steps')} data={p.get('data', {}).get('train')}")
        return 0
    preset, overrides = overrides_of(args)
    cfg = resolve_config(preset, args.config, overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    from lipkit.train.loop import train

    result = train(cfg)
    print(f"trained {result.step} steps, final loss {result.loss:.4f}")
    print(f"run directory: {result.run_dir}")
    print(f"checkpoint:    {result.checkpoint}")
    if result.data_summary:
        print(f"data:          {result.data_summary}")
    return 0

"""``lipkit data``: pack image-caption pairs into shards, build the built-in corpora, inspect data specs."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from lipkit.cli.options import add_alias, add_limit, add_quiet

if TYPE_CHECKING:
    from lipkit.data.pack import PackOptions, PackResult

HELP = """\
Prepare training data.

  lipkit data pack SOURCE --out-dir DIR     a folder (images + .txt/.json captions) or a CSV/TSV/Parquet
                                            table -> webdataset tar shards in img2dataset's layout
  lipkit data builtin NAME --out-dir DIR    build a built-in corpus from Debian packages
  lipkit data info SPEC                     what a data spec (as in data.train=...) holds

Packing is resumable: shards finished by an earlier run (those with a NNNNN_stats.json) are skipped.
Train on the result with `lipkit train PRESET --set data.train=DIR/{00000..00009}.tar` (or data.train=DIR).
"""

BUILTINS = ("tuxpaint", "emoji", "openclipart", "fashion-mnist", "mnist")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data",
        help="pack shards, build built-in corpora",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tasks = p.add_subparsers(dest="task", metavar="TASK", required=True)
    pk = tasks.add_parser("pack", help="pack a folder or table into tar shards", description=pack_description())
    pk.add_argument("source", help="a folder of images with .txt/.json captions, or a .csv/.tsv/.parquet table")
    pk.add_argument("--image-col", help="table column of image paths (default: image, filepath, path...)")
    pk.add_argument("--caption-col", help="table column of captions (default: caption, text, title...)")
    _packing_options(pk)
    pk.set_defaults(run=run_pack)
    b = tasks.add_parser("builtin", help="build a built-in corpus", description=builtin_description())
    b.add_argument("name", choices=BUILTINS, help="the corpus")
    _packing_options(b)
    b.set_defaults(run=run_builtin)
    i = tasks.add_parser("info", help="describe a data spec", description="Open a data spec and describe it.")
    i.add_argument("spec", help="e.g. 'shards/{00000..00009}.tar', 'tuxpaint:train', 'a/::0.7,emoji:train::0.3'")
    i.add_argument("--show", type=int, default=3, metavar="N", help="print the first N pairs of each source")
    i.set_defaults(run=run_info)


def pack_description() -> str:
    return (
        "Pack image-caption pairs into webdataset tar shards: NNNNN.tar holding KEY.jpg, KEY.txt, KEY.json "
        "per sample, and NNNNN_stats.json (count, failures by reason, sizes, seconds). Unreadable images "
        "and missing captions are counted and skipped. Keys and shard assignment follow the sorted input."
    )


def builtin_description() -> str:
    return (
        "Build a built-in corpus from installed Debian packages. Pairs (tuxpaint, emoji, openclipart) go "
        "to DIR/{train,val,test}/ as shards, split by key hash; labelled sets (fashion-mnist, mnist) are "
        "written in CLIP_benchmark's webdataset layout (evaluate with `wds:DIR`; name DIR wds_<name> so "
        "that prompt templates are found by name)."
    )


def _packing_options(p: argparse.ArgumentParser) -> None:
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-dir", metavar="DIR", help="output folder")
    add_alias(out, "--out", "--out-dir", "out_dir", metavar="DIR")
    p.add_argument("--samples-per-shard", type=int, default=10_000, metavar="N", help="default 10000")
    p.add_argument("--max-side", type=int, metavar="PX", help="shrink images to this longer side (default: keep)")
    p.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG/WebP quality (default 95)")
    p.add_argument("--format", default="jpg", choices=("jpg", "png", "webp"), help="image format (default jpg)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), metavar="N", help="processes")
    add_limit(p, "items of the input (for a quick try)")
    add_quiet(p, old="--no-progress")


def _options(args: argparse.Namespace) -> PackOptions:
    from lipkit.data.pack import PackOptions

    return PackOptions(args.samples_per_shard, args.max_side, args.quality, args.format, args.workers)


def _report(result: PackResult, label: str = "") -> None:
    left_out = ", ".join(f"{k} {v}" for k, v in result.failures.items()) or "none"
    fallbacks = f"; {result.caption_fallbacks} captions not UTF-8" if result.caption_fallbacks else ""
    print(
        f"{label}{result.successes} of {result.count} pairs in {result.shards} shards in {result.out} "
        f"({result.written} written, {result.shards - result.written} already done); left out: {left_out}{fallbacks}"
    )


def run_pack(args: argparse.Namespace) -> int:
    from lipkit.data.pack import file_items, pack

    items = file_items(args.source, args.image_col, args.caption_col)
    items = items[: args.limit] if args.limit else items
    _report(pack(items, args.out_dir, _options(args), progress=not args.quiet))
    return 0


def run_builtin(args: argparse.Namespace) -> int:
    if args.name in ("fashion-mnist", "mnist"):
        return _run_labelled(args)
    from lipkit.data.builtin import pack_corpus

    for split, result in pack_corpus(args.name, args.out_dir, _options(args), args.limit, not args.quiet).items():
        _report(result, f"{split:<5}: ")
    return 0


def _run_labelled(args: argparse.Namespace) -> int:
    from lipkit.data.builtin import write_labelled
    from lipkit.data.labelled import open_labelled, subsample
    from lipkit.eval.templates import default_templates

    for split in ("train", "test"):
        data = open_labelled(f"{args.name}:{split}")
        data = subsample(data, args.limit) if args.limit else data
        templates, _ = default_templates(args.name, getattr(data, "templates", None))
        shards = write_labelled(data, args.out_dir, split, templates, args.samples_per_shard, not args.quiet)
        where = f"{shards} shards in {args.out_dir}/{split}"
        print(f"{split:<5}: {len(data)} images of {len(data.classnames)} classes in {where}")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from lipkit.data.spec import open_mixture

    mixture = open_mixture(args.spec)
    for source, weight, name in zip(mixture.sources, mixture.weights, mixture.names):
        groups = source.groups()
        shards = f", {len(groups) - 1} shards" if groups is not None else ""
        lost = ", ".join(f"{k} {v}" for k, v in getattr(source, "skipped", {}).items() if v)
        print(f"{name}: {len(source)} pairs{shards}, weight {weight:.3f}" + (f"; lost: {lost}" if lost else ""))
        for i in range(min(args.show, len(source))):
            print(f"  {source.key(i)}: {source.caption(i)[:100]!r}")
    return 0

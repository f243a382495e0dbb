"""``lipkit embed``: embed the images and captions of a data spec into an embeddings folder."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from lipkit.cli.options import add_alias, add_limit, add_quiet

DESCRIPTION = """\
Embed the images and captions of a data spec with a model into an embeddings folder: parts of
NumPy vectors (one file per modality) with a Parquet table of keys and metadata (caption, source,
image path, thumbnail, size, extra table columns), and a manifest with the model's fingerprint.
`lipkit index build` makes a search index of it.

A re-run resumes: finished parts are kept, and only new or changed items are embedded (on a folder
of images: new or changed files; rows of removed files are dropped). Decoding runs in --workers
processes. Under torchrun the parts are shared between the ranks; with --ray the same job runs on a
Ray cluster through Ray Data, the model on an actor pool. All three give the same vectors."""

EPILOG = """\
examples:
  lipkit embed runs/tiny-tuxpaint --data tuxpaint:all,emoji:all --out-dir embeddings/builtin
  lipkit embed model.pt --model ViT-B-32 --data ~/photos --out-dir embeddings/photos --workers 4
  lipkit embed runs/x --data /data/laion/{00000..00099}.tar --out-dir emb/laion --modalities image
  torchrun --nproc-per-node 4 -m lipkit.cli.main embed runs/x --data /data/cc3m --out-dir emb/cc3m
  lipkit embed runs/x --data /data/cc3m --out-dir emb/cc3m --ray auto --ray-actors 8 --device cuda"""


if TYPE_CHECKING:
    from lipkit.index.embed import EmbedSummary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed",
        help="embed a collection of images and captions",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        metavar="MODEL_OR_RUN",
        help="a run directory (its newest checkpoint is used), a lipkit checkpoint, or OpenCLIP/OpenAI "
        "weights together with --model",
    )
    p.add_argument("--model", help="model config name (default: the one recorded in the checkpoint)")
    p.add_argument(
        "--data",
        required=True,
        help="pair source spec: tuxpaint[:SPLIT], emoji[:SPLIT], a folder of images with .txt/.json captions, "
        "a .csv/.tsv/.parquet table, or webdataset shards; comma-separated specs are embedded together",
    )
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-dir", metavar="DIR", help="the embeddings folder (created or updated)")
    add_alias(out, "--out", "--out-dir", "out_dir", metavar="DIR")
    p.add_argument(
        "--modalities",
        nargs="+",
        choices=("image", "text"),
        default=["image", "text"],
        help="which embeddings to make (default: image text)",
    )
    p.add_argument("--no-thumbnails", action="store_true", help="store no JPEG thumbnails of the images")
    p.add_argument("--batch-size", type=int, default=64, help="items per forward pass (default: 64)")
    p.add_argument("--part-size", type=int, default=10_000, help="items per part file (default: 10000)")
    p.add_argument("--workers", type=int, default=2, help="image decoding processes (default: 2)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda... (default: auto)")
    add_limit(p, "items of the data spec (the first ones)")
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run on a Ray cluster through Ray Data: its address (HOST:PORT, ray://HOST:PORT, auto), or `local` "
        "to start one on this machine",
    )
    p.add_argument("--ray-actors", type=int, default=1, metavar="N", help="model actors with --ray (default: 1)")
    add_quiet(p)
    p.set_defaults(run=run_embed)


def run_embed(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lipkit.index.embed import EmbedOptions, embed_collection
    from lipkit.index.encoder import load_encoder
    from lipkit.index.runners import choose_runner

    options = EmbedOptions(
        data=args.data,
        out=Path(args.out_dir),
        modalities=tuple(args.modalities),
        thumbnails=not args.no_thumbnails,
        batch_size=args.batch_size,
        part_size=args.part_size,
        limit=args.limit,
        progress=not args.quiet,
    )
    options.check()
    runner = choose_runner(args.device, args.workers, args.ray, args.ray_actors)
    try:
        encoder = load_encoder(args.checkpoint, args.model, runner.device)
        summary = embed_collection(encoder, options, runner)
    finally:
        runner.close()
    if runner.rank == 0:
        _report(summary, args.out_dir)
    return 0


def _report(s: EmbedSummary, out: str) -> None:
    line = f"{s.items} items in {s.parts} parts in {out}: {s.embedded} embedded, {s.kept} kept, {s.removed} removed"
    print(f"{line} ({s.seconds:.1f} s)")
    for what, counts in (("skipped (unreadable)", s.skipped), ("left out by the sources", s.source_skipped)):
        if counts:
            print(f"  {what}: " + ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(counts.items())))

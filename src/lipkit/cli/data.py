"""``lipkit data``: pack image-caption pairs into shards, build the built-in corpora, inspect data specs."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from lipkit.cli.options import add_alias, add_limit, add_quiet, add_seed

if TYPE_CHECKING:
    from lipkit.data.curation.config import CurateConfig, CurateResult
    from lipkit.data.pack import PackOptions, PackResult

HELP = """\
Prepare training data.

  lipkit data pack SOURCE --out-dir DIR     a folder (images + .txt/.json captions) or a CSV/TSV/Parquet
                                            table -> webdataset tar shards in img2dataset's layout
  lipkit data download TABLE --out-dir DIR  a table of image URLs and captions (LAION, DataComp, CC3M...)
                                            -> shards in the same layout, with a status row per URL
  lipkit data builtin NAME --out-dir DIR    build a built-in corpus from Debian packages
  lipkit data info SPEC                     what a data spec (as in data.train=...) holds
  lipkit data curate SPEC --out-dir DIR     balance (MetaCLIP), filter and deduplicate -> keys.txt or shards

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
    add_download_parser(tasks)
    b = tasks.add_parser("builtin", help="build a built-in corpus", description=builtin_description())
    b.add_argument("name", choices=BUILTINS, help="the corpus")
    _packing_options(b)
    b.set_defaults(run=run_builtin)
    i = tasks.add_parser("info", help="describe a data spec", description="Open a data spec and describe it.")
    i.add_argument("spec", help="e.g. 'shards/{00000..00009}.tar', 'tuxpaint:train', 'a/::0.7,emoji:train::0.3'")
    i.add_argument("--show", type=int, default=3, metavar="N", help="print the first N pairs of each source")
    i.set_defaults(run=run_info)
    add_curate_parser(tasks)


DOWNLOAD_DESCRIPTION = """\
Download a table of image URLs and captions into webdataset shards in img2dataset's layout: NNNNN.tar
(KEY.jpg, KEY.txt, KEY.json), NNNNN.parquet (one status row per URL: success, timeout, http_404,
connection_error, too_large, not_an_image, truncated, decompression_bomb, opted_out...) and
NNNNN_stats.json. The table is Parquet, CSV or TSV; its URL and caption columns are found by name (LAION's
URL/TEXT, DataComp's url/text...) or given; CC3M's TSV without a header is read as caption, URL.

Requests run --threads at a time in each of --processes processes, at most --per-host to one host, each
with a --timeout for the whole response and --retries (with backoff) after timeouts, connection errors and
5xx answers. X-Robots-Tag opt-outs (noai, noimageai, noindex, noimageindex) are honoured unless
--no-opt-out. A re-run skips finished shards and, within an unfinished one, the URLs already fetched."""

DOWNLOAD_EPILOG = """\
examples:
  lipkit data download laion_part.parquet --out-dir shards/laion --max-side 256 --processes 2
  lipkit data download cc3m_train.tsv --out-dir shards/cc3m --threads 64 --per-host 16
  lipkit data download datacomp.parquet --out-dir /shared/dc --ray auto     # shards on a Ray cluster
  lipkit train tiny-tuxpaint --set data.train=shards/laion"""


def add_download_parser(tasks: argparse._SubParsersAction) -> None:
    d = tasks.add_parser(
        "download",
        help="download a URL table into tar shards",
        description=DOWNLOAD_DESCRIPTION,
        epilog=DOWNLOAD_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("table", help="a .parquet, .csv or .tsv table of image URLs and captions")
    out = d.add_mutually_exclusive_group(required=True)
    out.add_argument("--out-dir", metavar="DIR", help="output folder")
    add_alias(out, "--out", "--out-dir", "out_dir", metavar="DIR")
    d.add_argument("--url-col", help="table column of URLs (default: url, URL, image_url...)")
    d.add_argument("--caption-col", help="table column of captions (default: caption, text, TEXT...)")
    d.add_argument("--samples-per-shard", type=int, default=10_000, metavar="N", help="default 10000")
    d.add_argument("--max-side", type=int, metavar="PX", help="shrink images to this longer side (default: keep)")
    d.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG/WebP quality (default 95)")
    d.add_argument("--format", default="jpg", choices=("jpg", "png", "webp"), help="image format (default jpg)")
    d.add_argument("--processes", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
                   help="shards fetched at once, one process each (default: up to 4)")  # fmt: skip
    d.add_argument("--threads", type=int, default=32, metavar="N", help="requests at once per process (default 32)")
    d.add_argument("--per-host", type=int, default=8, metavar="N", help="connections per host per process (default 8)")
    d.add_argument("--timeout", type=float, default=10.0, metavar="S", help="seconds per response (default 10)")
    d.add_argument("--retries", type=int, default=2, metavar="N", help="retries after transient faults (default 2)")
    d.add_argument("--max-bytes", type=int, default=20_000_000, metavar="B", help="largest body (default 20 MB)")
    d.add_argument("--no-opt-out", action="store_true", help="ignore X-Robots-Tag opt-outs (they are honoured)")
    d.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run the shards on a Ray cluster through Ray Data: HOST:PORT, ray://HOST:PORT, auto, or `local`; "
        "the output folder must be shared with its nodes",
    )
    add_limit(d, "rows of the table (the first ones)")
    add_quiet(d)
    d.set_defaults(run=run_download)


def run_download(args: argparse.Namespace) -> int:
    from lipkit.data.download import DownloadOptions, download, read_url_table

    options = DownloadOptions(
        samples_per_shard=args.samples_per_shard,
        max_side=args.max_side,
        quality=args.quality,
        image_format=args.format,
        processes=args.processes,
        threads=args.threads,
        per_host=args.per_host,
        timeout=args.timeout,
        retries=args.retries,
        max_bytes=args.max_bytes,
        respect_opt_out=not args.no_opt_out,
    )
    options.validate()
    rows = read_url_table(args.table, args.url_col, args.caption_col)
    rows = rows[: args.limit] if args.limit else rows
    result = download(rows, args.out_dir, options, progress=not args.quiet, ray_address=args.ray)
    failed = ", ".join(f"{kind} {n}" for kind, n in result.failures.items()) or "none"
    print(
        f"{result.successes} of {result.count} URLs in {result.shards} shards in {result.out} ({result.written} "
        f"written, {result.shards - result.written} already done) in {result.seconds:.1f} s; failed: {failed}"
    )
    return 0


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


def curate_description() -> str:
    return (
        "Curate a data spec: read every pair (unreadable ones are dropped and counted), filter, deduplicate, "
        "then balance with MetaCLIP's sampling; each sample leaves at the first stage that drops it. Writes "
        "DIR/keys.txt (the kept keys: use them with {source: SPEC, keys: DIR/keys.txt} in a data spec), "
        "DIR/provenance.parquet (every sample: stage, reason, matched entries, scores), DIR/card.html, "
        "DIR/curation.json (the settings and counts) and, with --write shards, DIR/shards/. The kept keys "
        "depend only on the data, the settings and --seed: not on --workers or --ray."
    )


class _ShownDefaults(argparse.HelpFormatter):
    """Help that ends each option with its default, when it has one and the text does not give it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.option_strings and action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += " (default: %(default)s)"
        return text


def add_curate_parser(tasks: argparse._SubParsersAction) -> None:
    """``lipkit data curate``: every stage's option shows its default in --help."""
    fmt = _ShownDefaults
    c = tasks.add_parser(
        "curate", help="balance, filter and deduplicate pairs", description=curate_description(), formatter_class=fmt
    )
    c.add_argument("spec", help="the data spec to curate, e.g. 'tuxpaint:all,emoji:all' or 'shards/{00000..00009}.tar'")
    c.add_argument("--out-dir", required=True, metavar="DIR", help="output folder")
    m = c.add_argument_group("metadata and balancing (MetaCLIP)")
    m.add_argument(
        "--metadata",
        default="wordnet,unigrams,bigrams",
        metavar="LIST",
        help="comma-separated entry sources: wordnet, unigrams, bigrams (mined from the captions) and "
        "list files (one entry per line); 'none' skips matching",
    )
    m.add_argument("--min-count", type=int, default=5, metavar="N", help="mined unigrams: fewest occurrences")
    m.add_argument("--min-bigram-count", type=int, default=3, metavar="N", help="mined bigrams: fewest occurrences")
    m.add_argument("--min-pmi", type=float, default=5.0, metavar="BITS", help="mined bigrams: lowest PMI")
    m.add_argument(
        "--balance",
        type=float,
        metavar="T",
        help="balance with threshold t: an entry matched by n "
        "samples keeps each with p = t / max(n, t) (default: no balancing)",
    )
    m.add_argument("--keep-unmatched", action="store_true", help="balancing keeps samples that match no entry")
    f = c.add_argument_group("filters (0 turns a check off)")
    f.add_argument("--min-words", type=int, default=3, metavar="N", help="captions: fewest words")
    f.add_argument("--min-chars", type=int, default=6, metavar="N", help="captions: fewest characters")
    f.add_argument("--min-side", type=int, default=200, metavar="PX", help="images: smallest shorter side")
    f.add_argument("--max-aspect", type=float, default=3.0, metavar="R", help="images: largest aspect ratio")
    f.add_argument(
        "--embeddings",
        metavar="DIR",
        help="an embeddings folder of the same spec (`lipkit embed`), for image-text scores and semantic dedup",
    )
    score = f.add_mutually_exclusive_group()
    score.add_argument("--min-score", type=float, metavar="S", help="keep image-text scores >= S (LAION: 0.28)")
    score.add_argument(
        "--top-fraction", type=float, metavar="F", help="keep the ceil(F * n) best image-text scores (DataComp: 0.3)"
    )
    d = c.add_argument_group("deduplication (the smallest key of each duplicate group is kept)")
    d.add_argument(
        "--dedup",
        default="exact,near",
        metavar="LIST",
        help="comma-separated: exact (image bytes), near (perceptual hash), caption (normalised "
        "text), semantic (SemDeDup on --embeddings); 'none' for no dedup",
    )
    d.add_argument("--near-distance", type=int, default=4, metavar="BITS", help="near: largest Hamming distance")
    d.add_argument("--semantic-threshold", type=float, default=0.94, metavar="COS", help="semantic: smallest cosine")
    d.add_argument(
        "--semantic-clusters", type=int, metavar="K", help="semantic: k-means clusters (default: one per 2000 samples)"
    )
    o = c.add_argument_group("output and execution")
    o.add_argument("--write", choices=("keys", "shards"), default="keys", help="a key list, or also new shards")
    o.add_argument("--samples-per-shard", type=int, default=10_000, metavar="N", help="with --write shards")
    o.add_argument("--workers", type=int, default=1, metavar="N", help="local processes for reading and matching")
    o.add_argument("--ray", metavar="ADDRESS", help="run the stages on Ray Data: 'local' or a cluster address")
    o.add_argument("--batch-size", type=int, default=256, metavar="N", help="samples per stage batch")
    add_seed(o, "balancing's coins and k-means", default=0)
    add_limit(o, "samples of the spec (for a quick try)")
    add_quiet(o)
    c.set_defaults(run=run_curate)


def _list_option(text: str) -> tuple[str, ...]:
    items = tuple(x.strip() for x in text.split(",") if x.strip())
    return () if items == ("none",) else items


HEAVY_FILTER = 0.5  # a threshold filter that drops at least this share of the samples reaching it is pointed out
# the threshold filters in stage order: their CurateConfig fields (option --field-name each) and where to lower them
THRESHOLD_FILTERS = {
    "caption": (("min_words", "min_chars"), "captions are short (titles, names)"),
    "image_size": (("min_side",), "images are small (icons, resized shards)"),
    "aspect": (("max_aspect",), "images are long strips"),
}


def _filter_notes(result: CurateResult, config: CurateConfig) -> list[str]:
    """A line for each threshold filter that dropped at least half of the samples that reached it, naming its
    options: DataComp's defaults are made for web alt-text and photos, and drop nearly everything of
    short titles or small images (the built-in corpora), which is rarely what the user meant."""
    reached = result.total - result.dropped.get("unreadable", 0) - result.dropped.get("no_embedding", 0)
    notes = []
    for stage, (fields, when) in THRESHOLD_FILTERS.items():  # each sees what the one before left
        n = result.dropped.get(stage, 0)
        if reached and n >= HEAVY_FILTER * reached:
            options = " ".join(f"--{name.replace('_', '-')} {getattr(config, name):g}" for name in fields)
            notes.append(
                f"note: the {stage} filter ({options}) dropped {n} of the {reached} samples that reached it; "
                f"where the {when}, lower it (0 turns it off)"
            )
        reached -= n
    return notes


def run_curate(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from lipkit.data.curation.curate import CurateConfig, curate
    from lipkit.data.curation.runner import choose_runner

    names = [f.name for f in fields(CurateConfig) if f.name not in ("data", "out", "metadata", "dedup")]
    config = CurateConfig(
        args.spec,
        args.out_dir,
        metadata=_list_option(args.metadata),
        dedup=_list_option(args.dedup),
        **{name: getattr(args, name) for name in names},
    )
    config.check()
    with choose_runner(args.workers, args.ray) as runner:
        result = curate(config, runner, progress=not args.quiet)
    dropped = ", ".join(f"{stage} {n}" for stage, n in result.dropped.items()) or "nothing"
    print(
        f"kept {result.kept} of {result.total} samples in {result.out}/keys.txt ({result.seconds:.1f} s); "
        f"dropped: {dropped}"
    )
    if result.caption_fallbacks:
        print(f"{result.caption_fallbacks} captions were not UTF-8 and were read as Windows-1252 (kept)")
    if result.source_skipped:
        print("the sources left out: " + ", ".join(f"{k} {v}" for k, v in result.source_skipped.items()))
    if result.shards is not None:
        _report(result.shards, "shards: ")
    for note in _filter_notes(result, config):
        print(note)
    print(f"provenance: {result.out}/provenance.parquet; data card: {result.out}/card.html")
    return 0

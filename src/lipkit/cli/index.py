"""``lipkit index``: build, change, inspect and search a vector index of an embeddings folder.

The parsers import nothing heavy: FAISS, the index and the model load inside the commands.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from lipkit.index.store import Hit, SearchIndex

DESCRIPTION = """\
Keep a search index of an embeddings folder (written by `lipkit embed`): FAISS for the search, SQLite
beside it for keys, metadata, thumbnails and the vectors. One index is one folder and belongs to the model
that made its embeddings; indexes of several models sit side by side in separate folders.
"""

EPILOG = """\
examples:
  lipkit index build emb/ --out-dir idx/                      exact below 20,000 items, IVF above
  lipkit index build emb/ --out-dir idx/ --memory-budget 1GB  IVF-PQ when the vectors do not fit
  lipkit index build emb/ --out-dir idx/ --type HNSW32        any FAISS factory string
  lipkit index add idx/ new-emb/                              add or replace items by key
  lipkit index delete idx/ photo-0001 photo-0002
  lipkit index info idx/
  lipkit index search idx/ --text "a red car" --where "source = emoji" --k 5
  lipkit index search idx/ --text car --minus-text toy        weighted combination
  lipkit index search idx/ --key photo-0001                   more like this
"""

SEARCH_EPILOG = """\
Query terms add up (each weight 1, --minus-text -1) into one query vector. Text and image terms load the
index's model from the checkpoint its record names, and refuse one whose weights changed.

filters (--where): `source = emoji`, `source != tuxpaint`, `width >= 200`, `source in (emoji, tuxpaint)`,
joined by ` and `; `key` and every metadata column may be named (`lipkit index info` lists them).

examples:
  lipkit index search idx/ --text "a dog on a beach" --k 20 --offset 20      the second page
  lipkit index search idx/ --image query.jpg --collapse 0.94                 one of each near-duplicate group
  lipkit index search idx/ --text car --minus-text toy --json
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "index",
        help="build, change, inspect and search vector indexes",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION")
    p.set_defaults(run=lambda args: _usage(p))
    _add_build(actions)
    _add_add(actions)
    _add_delete(actions)
    _add_info(actions)
    _add_search(actions)
    _add_maintenance(actions)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return 2


def _add_build(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "build",
        help="build an index of an embeddings folder",
        description="Build a new index folder of every part of an embeddings folder.",
        epilog=(
            "The type: exact (IDMap2,Flat) below 20,000 vectors; IVF{K},Flat when the vectors fit the memory\n"
            "budget; IVF{K},PQ{m}x8 (re-ranked with the exact vectors kept in SQLite) when they do not;\n"
            "memory-mapped from disk when even that does not fit. Default search settings are tuned for\n"
            "recall@10 >= 0.95 against exact search and stored in the index.\n\n"
            "example:\n  lipkit index build emb/ --out-dir idx/ --memory-budget 2GB"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("embeddings", metavar="EMBEDDINGS_DIR", help="folder written by `lipkit embed`")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="the new index folder")
    p.add_argument("--modality", choices=("image", "text"), default="image", help="vectors to index (default image)")
    p.add_argument("--type", default="auto", metavar="auto|FACTORY", help="index type: auto or a FAISS factory string")
    p.add_argument("--memory-budget", default=None, metavar="SIZE", help="memory the index may take (default 8GB)")
    p.set_defaults(run=run_build)


def _add_add(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "add",
        help="add or replace items from an embeddings folder",
        description="Add the items of an embeddings folder to an index; keys it holds already are replaced.",
        epilog="example:\n  lipkit index add idx/ new-emb/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("embeddings", metavar="EMBEDDINGS_DIR", help="made by the index's own model")
    p.set_defaults(run=run_add)


def _add_delete(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "delete",
        help="remove items by key",
        description="Remove items by key; keys the index does not hold are ignored (and counted).",
        epilog=(
            "examples:\n  lipkit index delete idx/ photo-0001 photo-0002\n"
            "  lipkit index delete idx/ --keys-file gone.txt"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("keys", nargs="*", metavar="KEY")
    p.add_argument("--keys-file", metavar="FILE", help="one key per line")
    p.set_defaults(run=run_delete)


def _add_info(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "info",
        help="size, type, bytes per vector, recall@10, model",
        description="Describe an index: size, FAISS type, bytes per vector, search settings, recall@10 against "
        "exact search on a sample of stored vectors, filter columns and the model record.",
        epilog="example:\n  lipkit index info idx/ --json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--recall-sample", type=int, default=200, metavar="N", help="queries for recall@10 (0: skip)")
    p.set_defaults(run=run_info)


def _add_search(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "search",
        help="search by text, image or key",
        description="Search an index by text, by image, or by an indexed item (more like this).",
        epilog=SEARCH_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("index", metavar="INDEX_DIR")
    p.add_argument("--text", action="append", default=[], help="a text query (repeatable)")
    p.add_argument("--minus-text", action="append", default=[], metavar="TEXT", help="steer away from a text")
    p.add_argument("--image", action="append", default=[], metavar="FILE", help="an image query (repeatable)")
    p.add_argument("--key", action="append", default=[], help="an indexed item's key: more like it (repeatable)")
    p.add_argument("--k", type=int, default=10, metavar="N", help="results (default 10)")
    p.add_argument("--offset", type=int, default=0, metavar="N", help="results to skip: the page start (default 0)")
    p.add_argument("--where", metavar="EXPR", help="a metadata filter, e.g. 'source = emoji and width >= 200'")
    p.add_argument("--collapse", type=float, metavar="COSINE", help="collapse near-duplicates at this cosine")
    p.add_argument("--device", default="cpu", help="where the model runs for text and image terms (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run_search)


def _add_maintenance(actions: argparse._SubParsersAction) -> None:
    p = actions.add_parser(
        "compact",
        help="rebuild the FAISS index from the stored vectors",
        description="Rebuild the FAISS index from the vectors kept in SQLite: drops tombstones (HNSW deletes) "
        "and the exact side index of a memory-mapped one, and re-balances after many changes.",
    )
    p.add_argument("index", metavar="INDEX_DIR")
    p.set_defaults(run=run_compact)
    p = actions.add_parser(
        "repair",
        help="rebuild a lost or damaged FAISS file",
        description="Rebuild the FAISS snapshot of an index from its SQLite file (meta.sqlite).",
    )
    p.add_argument("index", metavar="INDEX_DIR")
    p.set_defaults(run=run_repair)


# ----- commands -----


def run_build(args: argparse.Namespace) -> int:
    from lipkit.index.store import SearchIndex, parse_bytes

    budget = parse_bytes(args.memory_budget) if args.memory_budget else None
    index = SearchIndex.build_from_embeddings(
        args.out_dir, args.embeddings, modality=args.modality, index_type=args.type, memory_budget=budget
    )
    with index:
        print(f"built {index.path}: {len(index)} {index.modality} vectors, {index.index_type} {index.params or ''}")
    return 0


def run_add(args: argparse.Namespace) -> int:
    from lipkit.data.embeddings import open_embeddings
    from lipkit.index.store import SearchIndex

    embeddings = open_embeddings(args.embeddings)
    with SearchIndex.open(args.index) as index:
        index.check_model(embeddings.record)
        if index.modality not in embeddings.modalities:
            from lipkit.errors import LipkitError

            raise LipkitError(f"{args.embeddings} has no {index.modality} vectors, which {index.path} indexes")
        before, written = len(index), 0
        for part in embeddings.iter_parts():
            written += index.add(part.keys, part.vectors[index.modality], part.metadata)
        print(f"{index.path}: wrote {written} items ({len(index) - before} new), {len(index)} in all")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from lipkit.errors import LipkitError
    from lipkit.index.store import SearchIndex

    keys = list(args.keys)
    if args.keys_file:
        try:
            keys += [line.strip() for line in Path(args.keys_file).read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise LipkitError(f"cannot read --keys-file {args.keys_file}: {exc.strerror}") from None
    if not keys:
        raise LipkitError("no keys to delete: give KEY... or --keys-file FILE")
    with SearchIndex.open(args.index) as index:
        removed = index.delete(keys)
        print(f"{index.path}: removed {removed} of {len(set(keys))} keys, {len(index)} items left")
    return 0


def run_info(args: argparse.Namespace) -> int:
    from lipkit.index.store import SearchIndex
    from lipkit.utils import strict_json

    with SearchIndex.open(args.index) as index:
        info = index.info(recall_sample=max(args.recall_sample, 0))
    if args.json:
        print(strict_json(info, indent=2))
        return 0
    for line in _info_lines(info):
        print(line)
    return 0


def _info_lines(info: dict[str, Any]) -> list[str]:
    recall = info["recall_at_10"]
    model = info["model"]
    config = model["config"] if isinstance(model["config"], str) else "(config dict)"
    mapped = ", memory-mapped" if info["memory_mapped"] else ""
    per_item = info["disk_bytes"] / max(info["items"], 1)
    return [
        f"index:          {info['path']}",
        f"items:          {info['items']} {info['modality']} vectors of width {model['embed_dim']}",
        f"type:           {info['index_type']} ({info['faiss_class']}){mapped}",
        f"search:         {info['search_params'] or 'exact'}",
        f"bytes/vector:   {info['bytes_per_vector']} in FAISS, {per_item:.0f} for the whole folder",
        f"recall@10:      {'not measured' if recall is None else f'{recall:.3f}'} (against exact search)",
        f"tombstones:     {info['tombstones']} (lipkit index compact drops them)",
        f"filter columns: {', '.join(f'{k} ({v})' for k, v in info['columns'].items()) or '(none)'}",
        f"model:          {model['fingerprint'][:12]} {config}, checkpoint {model['checkpoint']}",
    ]  # fmt: skip


def run_search(args: argparse.Namespace) -> int:
    from lipkit.index.store import SearchIndex

    if not (args.text or args.image or args.key or args.minus_text):
        from lipkit.errors import LipkitError

        raise LipkitError("nothing to search by: give --text, --image or --key")
    with SearchIndex.open(args.index) as index:
        query = _query_vector(index, args)
        hits = index.search(query, args.k, where=args.where, offset=args.offset, collapse=args.collapse)[0]
    _print_hits(hits, args)
    return 0


def _query_vector(index: SearchIndex, args: argparse.Namespace) -> np.ndarray:
    """The combined query: every term (text, image, key) with weight 1, the --minus-text terms with -1."""
    from lipkit.index.query import combine

    vectors, weights = [], []
    if args.text or args.minus_text or args.image:
        encoder = _encoder(index, args.device)
        for texts, weight in ((args.text, 1.0), (args.minus_text, -1.0)):
            if texts:
                vectors += list(encoder.encode_texts(texts))
                weights += [weight] * len(texts)
        if args.image:
            vectors += list(encoder.encode_images([_open_image(f) for f in args.image]))
            weights += [1.0] * len(args.image)
    if args.key:
        vectors += list(index.vectors(args.key))
        weights += [1.0] * len(args.key)
    return combine(vectors, weights)


def _encoder(index: SearchIndex, device: str) -> Any:
    from lipkit.index.encoder import encoder_for_record

    encoder = encoder_for_record(index.record, device)
    index.check_model(encoder.record)
    return encoder


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    from lipkit.errors import LipkitError

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except FileNotFoundError:
        raise LipkitError(f"--image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise LipkitError(f"--image {path}: not an image Pillow can read ({exc})") from None


def _print_hits(hits: list[Hit], args: argparse.Namespace) -> None:
    if args.json:
        from lipkit.utils import strict_json

        print(strict_json([{"key": h.key, "score": h.score, "id": h.id, "metadata": h.metadata} for h in hits]))
        return
    if not hits:
        print("no results")
    for rank, hit in enumerate(hits, start=args.offset + 1):
        caption = str(hit.metadata.get("caption", ""))[:70]
        source = hit.metadata.get("source")
        print(f"{rank:4d}  {hit.score:.4f}  {hit.key}  {caption}" + (f"  [{source}]" if source else ""))


def run_compact(args: argparse.Namespace) -> int:
    from lipkit.index.store import SearchIndex

    with SearchIndex.open(args.index) as index:
        index.compact()
        print(f"compacted {index.path}: {len(index)} items, {index.index_type}")
    return 0


def run_repair(args: argparse.Namespace) -> int:
    from lipkit.index.store import SearchIndex

    with SearchIndex.repair(args.index) as index:
        print(f"repaired {index.path}: rebuilt {index.index_type} of {len(index)} items from meta.sqlite")
    return 0

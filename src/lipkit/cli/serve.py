"""``lipkit serve``: serve indexes over HTTP (JSON API, web page, clip-retrieval's API)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from lipkit.errors import LipkitError

TOKEN_ENV = "LIPKIT_SERVE_TOKEN"

EPILOG = f"""\
Each index is served under its folder name with the model that made it (reloaded from the checkpoint
its record names). Add and delete need a bearer token: --token-file FILE, or ${TOKEN_ENV}; without one
the index is read-only. The server binds to 127.0.0.1 unless --host says otherwise.

examples:
  lipkit serve --index indexes/tuxpaint
  lipkit serve --index indexes/photos --index indexes/photos-siglip --port 8080 --token-file token.txt
  curl 'http://127.0.0.1:8000/api/indexes/tuxpaint/search?q=a+red+apple&k=5'
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve indexes over HTTP: search API, web page, clip-retrieval API",
        description="Serve one or more indexes: text and image search, a web page, Prometheus metrics.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--index", action="append", required=True, metavar="DIR", help="an index folder (repeatable)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--token-file", metavar="FILE", help=f"file holding the bearer token for writes (or ${TOKEN_ENV})")
    p.add_argument("--device", default="auto", help="where the models run: auto, cpu, cuda... (default: auto)")
    p.add_argument(
        "--text-runtime",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="what encodes text queries: onnx (ONNX Runtime on CPU, about twice PyTorch's speed for short queries; "
        "exported once per model and checked against PyTorch), torch, or auto: onnx where it is installed and "
        "the model runs on CPU (default: auto)",
    )
    p.add_argument("--max-upload-mb", type=float, default=10.0, metavar="MB", help="largest image upload (default: 10)")
    p.add_argument(
        "--batch-regroup",
        type=float,
        default=0.5,
        metavar="FRACTION",
        help="a text batch smaller than the previous round waits at most this fraction of the last batch's "
        "encoding time for the rest, so that clients which wait for each answer share full batches instead of "
        "taking turns in half-full ones; 0 never waits (default: 0.5)",
    )
    p.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin allowed to call the API from a browser, e.g. a hosted clip-retrieval front end",
    )
    p.set_defaults(run=run)


def read_token(token_file: str | None) -> str | None:
    """The write token from ``token_file`` (first line) or the environment; None if neither.

    Raises:
        LipkitError: The file cannot be read or is empty.
    """
    if token_file:
        try:
            token = Path(token_file).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise LipkitError(f"cannot read the token file {token_file}: {exc.strerror or exc}") from None
        if not token:
            raise LipkitError(f"the token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def load_indexes(folders: list[str], device: str, text_runtime: str = "auto") -> dict[str, Any]:
    """Open each index and reload the model its record names, keyed by the folder name.

    ``text_runtime`` is what encodes text queries (see :class:`~lipkit.index.encoder.QueryEncoder`).

    Raises:
        LipkitError: Two folders with the same name, a damaged index, or a model that changed.
    """
    from lipkit.index.encoder import encoder_for_record
    from lipkit.index.store import SearchIndex

    served: dict[str, Any] = {}
    for folder in folders:
        index = SearchIndex.open(folder)
        if index.name in served:
            raise LipkitError(f"two indexes are named {index.name!r}: give them folders with different names")
        served[index.name] = (index, encoder_for_record(index.record, device, text_runtime))
    return served


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from lipkit.serve.app import create_app
    from lipkit.serve.limits import Limits

    if args.max_upload_mb <= 0:
        raise LipkitError("--max-upload-mb must be positive")
    if not 0 <= args.batch_regroup <= 10:
        raise LipkitError("--batch-regroup must be between 0 and 10")
    token = read_token(args.token_file)
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 1024 * 1024), batch_regroup=args.batch_regroup)
    indexes = load_indexes(args.index, args.device, args.text_runtime)
    try:
        app = create_app(indexes, token=token, limits=limits, cors_origins=args.cors_origin)
        writes = "on (bearer token)" if token else "off (no token)"
        names = ", ".join(f"{name} (text on {encoder.text_runtime})" for name, (_, encoder) in indexes.items())
        print(f"lipkit serve: {names} at http://{args.host}:{args.port}/  writes {writes}", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    finally:
        for index, _ in indexes.values():
            index.close()  # a last snapshot of the changes made while serving
    return 0

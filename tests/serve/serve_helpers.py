"""Helpers of the server tests: a real index of built-in corpus items, made with a tiny random-weight model, and
a real uvicorn server on a free loopback port in a background thread."""

from __future__ import annotations

import io
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TOKEN = "test-token-0123456789"


@dataclass
class Corpus:
    """The indexed items: keys, captions, sources, images and their vectors, plus the encoder."""

    keys: list[str]
    captions: list[str]
    sources: list[str]
    images: list
    vectors: np.ndarray
    encoder: object
    record: object


def png_bytes(image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def jpeg_bytes(image) -> bytes:
    out = io.BytesIO()
    image.convert("RGB").save(out, format="JPEG")
    return out.getvalue()


def build_index(corpus: Corpus, folder: Path):
    """A fresh index of the corpus in ``folder``."""
    from lipkit.index.store import SearchIndex
    from lipkit.serve.images import thumbnail_jpeg

    metadata = [
        {"caption": c, "source": s, "thumbnail": thumbnail_jpeg(im), "width": im.width, "height": im.height}
        for c, s, im in zip(corpus.captions, corpus.sources, corpus.images, strict=True)
    ]
    return SearchIndex.build(folder, corpus.keys, corpus.vectors, metadata, record=corpus.record)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """A uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(corpus: Corpus, folder: Path, **options):
    """A running server over a fresh index of the corpus, named ``corpus``."""
    from lipkit.serve.app import create_app

    index = build_index(corpus, folder)
    app = create_app({"corpus": (index, corpus.encoder)}, token=TOKEN, **options)
    return LiveServer(app), index

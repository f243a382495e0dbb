"""The text-search route's own cost on the event loop: lipkit's fast path, its parameter table on FastAPI's
routing, and FastAPI's per-field validation.

One app, lipkit's (``create_app``: its middleware, its service, a small exact index and a stand-in encoder
that costs nothing, so what is timed is the route), answers three routes:

- ``lipkit``: its own ``GET /api/indexes/bench/search?q=...&k=10``, answered by the text-search fast path
  (``TextSearchFastPath``, a middleware in front of FastAPI's routing);
- ``lipkit-routed``: ``GET /plain/indexes/bench/search``, the same handler (``text_search``, the parameters
  read through ``lipkit.serve.params``) declared as a FastAPI route, as the spec describes it;
- ``fastapi``: ``GET /peer/indexes/bench/search``, the same route declared the usual way, each parameter a
  FastAPI ``Query`` with its bounds, validated by pydantic.

The two peers are inserted first in the route list, so that routing costs them nothing extra. Requests are
made as ASGI calls, without sockets, one at a time; each side runs ``--rounds`` timings of ``--requests``
requests, alternated, and the CPU time of the event-loop thread per request is printed, with the ratios.

    python benchmarks/search_route.py
"""

# No `from __future__ import annotations`: FastAPI reads the peer route's signature, whose types are local.
import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np

from results import append_result


class StandInEncoder:
    """Random unit vectors for any text, at no cost: the route is what is measured."""

    text_runtime = "none"

    def __init__(self, dim: int) -> None:
        from lipkit.data.embeddings import ModelRecord

        self.embed_dim = dim
        self.record = ModelRecord("1" * 64, dim, "stand-in", None)
        self.rng = np.random.default_rng(0)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        vectors = self.rng.standard_normal((len(texts), self.embed_dim)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def add_peers(app: Any, limits: Any) -> None:
    """lipkit's handler as a FastAPI route, and the same search route with FastAPI's ``Query`` parameters
    (what lipkit's route replaced), first in ``app``."""
    from fastapi import Query, Request
    from fastapi.responses import JSONResponse

    from lipkit.serve.app import page, text_search
    from lipkit.serve.params import SearchParams
    from lipkit.serve.service import SearchOptions

    served = app.state.served
    params = SearchParams(limits)

    @app.get("/plain/indexes/{index}/search")
    async def search_routed(index: str, request: Request) -> JSONResponse:
        return JSONResponse(await text_search(served, params, index, request.query_params))

    app.router.routes.insert(0, app.router.routes.pop())

    @app.get("/peer/indexes/{index}/search")
    async def search_text(
        index: str,
        q: Annotated[str, Query(min_length=1, max_length=limits.max_text_chars)],
        k: Annotated[int, Query(ge=1, le=limits.max_k)] = 10,
        offset: Annotated[int, Query(ge=0, le=limits.max_offset)] = 0,
        where: Annotated[str | None, Query(max_length=limits.max_text_chars)] = None,
        collapse: Annotated[float | None, Query(gt=0, le=1)] = None,
    ) -> JSONResponse:
        service = served.service(index)
        options = SearchOptions(k, offset, where or None, collapse)
        return JSONResponse(await page(service, await service.text_vector(q), options))

    app.router.routes.insert(0, app.router.routes.pop())  # matched first


async def call(app: Any, path: str, query: bytes) -> int:
    """One GET of ``path`` as an ASGI call; its status."""
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "scheme": "http",
        "path": path, "raw_path": path.encode(), "query_string": query, "root_path": "",
        "headers": [(b"host", b"127.0.0.1")], "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {},
    }  # fmt: skip
    await app(scope, receive, send)
    return sent[0]["status"]


async def loop_cpu_per_request(app: Any, path: str, requests: int) -> float:
    """Microseconds of this thread's CPU per request to ``path``."""
    start = time.thread_time()
    for i in range(requests):
        status = await call(app, path, f"q=a+red+cat+{i % 50}&k=10".encode())
        if status != 200:
            raise SystemExit(f"the route answered {status}")
    return 1e6 * (time.thread_time() - start) / requests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000, help="items in the exact index (default 2000)")
    parser.add_argument("--requests", type=int, default=3000, help="requests per timing (default 3000)")
    parser.add_argument("--rounds", type=int, default=8, help="timings per side, alternated (default 8)")
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    args = parser.parse_args()

    from lipkit.index.store import SearchIndex
    from lipkit.serve.app import create_app
    from lipkit.serve.limits import Limits

    encoder = StandInEncoder(256)
    limits = Limits()
    with tempfile.TemporaryDirectory() as tmp:
        vectors = encoder.encode_texts(["x"] * args.items)
        keys = [f"item/{i}" for i in range(args.items)]
        metadata = [{"caption": f"item number {i}", "source": "emoji"} for i in range(args.items)]
        index = SearchIndex.build(Path(tmp) / "bench", keys, vectors, metadata, record=encoder.record)
        app = create_app({"bench": (index, encoder)}, limits=limits)
        add_peers(app, limits)
        paths = {
            "lipkit": "/api/indexes/bench/search",
            "lipkit-routed": "/plain/indexes/bench/search",
            "fastapi": "/peer/indexes/bench/search",
        }

        async def measure() -> dict[str, list[float]]:
            times: dict[str, list[float]] = {side: [] for side in paths}
            async with app.router.lifespan_context(app):
                for path in paths.values():
                    await loop_cpu_per_request(app, path, 100)  # warm-up
                for _ in range(args.rounds):
                    for side, path in paths.items():
                        times[side].append(await loop_cpu_per_request(app, path, args.requests))
            return times

        times = asyncio.run(measure())
        index.close()
    best = {side: min(values) for side, values in times.items()}
    for side, values in times.items():
        print(f"{side}: {', '.join(f'{v:.0f}' for v in values)} us of event-loop CPU per request")
    ratio = best["fastapi"] / best["lipkit"]
    routed = best["lipkit-routed"] / best["lipkit"]
    print(f"ratio lipkit-routed/lipkit, the fast path (best of {args.rounds}): {routed:.2f}x")
    print(f"ratio fastapi/lipkit-routed, the parameter table: {best['fastapi'] / best['lipkit-routed']:.2f}x")
    print(f"ratio fastapi/lipkit (best of {args.rounds}): {ratio:.2f}x")
    append_result(
        args.json,
        "search_route",
        {
            "us_per_request": times, "ratio": round(ratio, 3), "fast_path_ratio": round(routed, 3),
            "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
        },
    )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

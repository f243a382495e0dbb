"""The search server under load: text queries/s and latency over HTTP, against the same loop in-process.

Builds an index of ``--items`` items (default 100,000) of the model's embedding size, serves it with
``lipkit serve``'s app (uvicorn on 127.0.0.1), and runs ``--clients`` concurrent clients (default 8) in a
separate process, each sending text queries one after another over a kept-alive connection. Then the same
encode-and-search work runs in-process without HTTP: the same number of concurrent callers through the
same batching service. The two sides alternate, ``--rounds`` rounds (default 3) of ``--seconds`` each
(default 5), so that the machine's drift in speed falls on both. Printed: queries/s, p50/p99 latency, the
mean text-encoder batch of each side, and the ratio HTTP / in-process over all rounds, with each round's
(goals: >= 300 q/s, p99 <= 100 ms, ratio >= 0.8).

The model is the quickstart's LiT model when it has been trained (``--checkpoint``, default
runs/quickstart/lit); otherwise ``--model``'s config with random weights, which the output says. The
item vectors are made (the built-in corpora hold about two thousand items, not 100,000): each is the
model's embedding of one of 1,000 phrases plus noise, so they cluster as real embeddings do, which sets
the index type's tuned search settings. The queries are encoded by the model.

``--soak SECONDS`` instead runs a mixed load (searches, adds and deletes from every client) for that
long, then counts: the index must hold exactly the items added and not deleted, every added item must be
found and every deleted one gone, with zero errors.

    python benchmarks/search_server.py                                   # 100k items, 8 clients, 3 x 5 s
    python benchmarks/search_server.py --items 2000 --seconds 2 --model micro
    python benchmarks/search_server.py --soak 60
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import platform
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import numpy as np

from results import append_result

NOUNS = [
    "cat",
    "dog",
    "bird",
    "fish",
    "horse",
    "apple",
    "banana",
    "car",
    "bicycle",
    "tree",
    "flower",
    "house",
    "boat",
    "train",
    "guitar",
    "clock",
    "umbrella",
    "penguin",
    "frog",
    "dragon",
    "star",
    "moon",
    "sun",
    "cloud",
    "rocket",
    "robot",
    "pizza",
    "cake",
    "chair",
    "lamp",
    "book",
    "key",
    "heart",
    "ghost",
    "crown",
]
ADJECTIVES = [
    "red",
    "blue",
    "green",
    "small",
    "big",
    "happy",
    "old",
    "shiny",
    "dark",
    "striped",
    "wooden",
    "flying",
    "smiling",
]
SOURCES = ("emoji", "tuxpaint", "photos", "drawings")


def queries(n: int, seed: int) -> list[str]:
    """``n`` varied short text queries."""
    rng = random.Random(seed)
    return [f"a {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}" for _ in range(n)]


def load_model(args: argparse.Namespace) -> tuple[Any, str]:
    """The query encoder and a line saying which model it is."""
    import torch

    from lipkit.index.encoder import QueryEncoder, load_encoder
    from lipkit.models import create_model

    runtime = args.text_runtime
    if args.checkpoint and Path(args.checkpoint).exists():
        encoder = load_encoder(args.checkpoint, device="cpu", text_runtime=runtime)
        return encoder, f"trained model {args.checkpoint}, text on {encoder.text_runtime}"
    torch.manual_seed(0)
    encoder = QueryEncoder(create_model(args.model), "cpu", config=args.model, text_runtime=runtime)
    missing = args.checkpoint or "no checkpoint"
    note = f"model config {args.model} with random weights ({missing} not found)"
    return encoder, f"{note}, text on {encoder.text_runtime}"


def build_index(folder: Path, encoder: Any, items: int) -> Any:
    """An index of ``items`` unit vectors with captions and sources, recorded as ``encoder``'s model's.

    The vectors gather, as real embeddings do, around the model's own embeddings of 1,000 phrases (each
    item one of them plus noise), so the index is tuned as it would be for a real collection: vectors
    drawn uniformly on the sphere have no near neighbours, and the tuner then probes every IVF list.
    """
    from lipkit.index.store import SearchIndex

    rng = np.random.default_rng(0)
    phrases = queries(1000, seed=12345)
    centres = np.concatenate([encoder.encode_texts(phrases[i : i + 64]) for i in range(0, len(phrases), 64)])
    vectors = centres[rng.integers(0, len(centres), items)]
    vectors = vectors + rng.normal(0.0, 0.03, vectors.shape).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    keys = [f"item/{i}" for i in range(items)]
    metadata = [{"caption": f"item number {i}", "source": SOURCES[i % len(SOURCES)]} for i in range(items)]
    return SearchIndex.build(folder, keys, vectors, metadata, record=encoder.record)


class Server:
    """The app on uvicorn, on a free loopback port, in a thread of this process."""

    def __init__(self, app: Any) -> None:
        import socket

        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# ----- the client process -----


def call(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None, token: str = "") -> tuple:
    """One request; returns (status, parsed JSON body)."""
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=json.dumps(body) if body is not None else None, headers=headers)
    response = conn.getresponse()
    data = response.read()
    return response.status, json.loads(data) if data else None


class RawClient:
    """A minimal HTTP/1.1 GET client over one kept-alive socket, as load generators such as wrk are.

    The benchmark measures the server, and client and server share the machine's cores: ``http.client``
    parses every response's headers with the email parser, about 0.15 ms of CPU per request here, which
    would be taken from the server. This client sends the request line and reads the status and the body
    by its Content-Length, nothing more.
    """

    def __init__(self, port: int) -> None:
        import socket

        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def get(self, path: str) -> tuple[int, bytes]:
        """(status, body) of one GET."""
        self.sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self._recv()
        head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in lines[1:] if line.lower().startswith(b"content-length:"))
        while len(self.buffer) < length:
            self.buffer += self._recv()
        body, self.buffer = self.buffer[:length], self.buffer[length:]
        return status, body

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        return data

    def close(self) -> None:
        self.sock.close()


def search_client(port: int, index: str, texts: list[str], stop_at: float, out: list) -> None:
    """Send text queries back to back until ``stop_at``; append (end time, latency, ok) per query.

    A query is ok when it answers 200 with ten results (every 16th body is parsed to check; a failed
    answer always is, as its status says).
    """
    client = RawClient(port)
    paths = [f"/api/indexes/{index}/search?{urlencode({'q': text, 'k': 10})}" for text in texts]
    i = 0
    while time.perf_counter() < stop_at:
        start = time.perf_counter()
        status, body = client.get(paths[i % len(paths)])
        end = time.perf_counter()
        ok = status == 200 and (i % 16 or len(json.loads(body)["results"]) == 10)
        out.append((end, end - start, bool(ok)))
        i += 1
    client.close()


def run_clients(port: int, index: str, clients: int, seconds: float, warmup: float, queue: Any) -> None:
    """The load process: ``clients`` threads; puts the measured latencies (after the warm-up) on ``queue``."""
    texts = queries(500, seed=1)
    start = time.perf_counter()
    results: list[list] = [[] for _ in range(clients)]
    threads = [
        threading.Thread(target=search_client, args=(port, index, texts[c::clients], start + warmup + seconds, r))
        for c, r in enumerate(results)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    measured_from = start + warmup
    queue.put([(latency, ok) for r in results for end, latency, ok in r if end >= measured_from])


def soak_client(port: int, index: str, token: str, seed: int, seconds: float, dim: int, queue: Any) -> None:
    """Mixed load for ``seconds``: 80% searches, 10% adds of new keys, 10% deletes of this client's own added keys."""
    stop_at = time.perf_counter() + seconds  # from this process's start: spawning takes a while
    rng = random.Random(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    texts, added, deleted, errors, n = queries(200, seed), [], [], [], 0
    while time.perf_counter() < stop_at:
        roll = rng.random()
        if roll < 0.1:
            key = f"soak/{seed}/{n}"
            vector = np.random.default_rng(seed * 10**6 + n).standard_normal(dim).tolist()
            status, body = call(
                conn, "POST", f"/api/indexes/{index}/items", {"items": [{"key": key, "vector": vector}]}, token
            )
            ok = status == 200 and body["added"] == 1
            added.append(key) if ok else errors.append(f"add {status} {body}")
        elif roll < 0.2 and len(added) > len(deleted) + 1:
            key = rng.choice([k for k in added if k not in set(deleted)])
            status, body = call(conn, "POST", f"/api/indexes/{index}/items/delete", {"keys": [key]}, token)
            ok = status == 200 and body["deleted"] == 1
            deleted.append(key) if ok else errors.append(f"delete {status} {body}")
        else:
            status, body = call(
                conn, "GET", f"/api/indexes/{index}/search?{urlencode({'q': rng.choice(texts), 'k': 10})}"
            )
            if status != 200 or len(body["results"]) != 10:
                errors.append(f"search {status}")
        n += 1
    queue.put({"requests": n, "added": added, "deleted": deleted, "errors": errors})
    conn.close()


# ----- the measurements -----


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def measure_http(port: int, index: str, args: argparse.Namespace) -> dict[str, float]:
    """Queries/s and the latencies over HTTP from a separate client process."""
    queue = mp.get_context("spawn").Queue()
    process = mp.get_context("spawn").Process(
        target=run_clients, args=(port, index, args.clients, args.seconds, args.warmup, queue)
    )
    process.start()
    kept = queue.get(timeout=args.warmup + args.seconds + 600)
    process.join()
    errors = sum(1 for _, ok in kept if not ok)
    return {"http_qps": len(kept) / args.seconds, "latencies": [v for v, _ in kept], "http_errors": errors}


def measure_in_process(index: Any, encoder: Any, args: argparse.Namespace) -> tuple[float, float]:
    """Queries/s of the same encode-and-search work through the same batching service, without HTTP, and the
    mean queries per text-encoder batch."""
    from lipkit.serve.limits import Limits
    from lipkit.serve.service import IndexService, SearchOptions

    texts = queries(500, seed=1)

    async def caller(service: IndexService, part: list[str], stop_at: float, done: list[int]) -> None:
        i = 0
        while time.perf_counter() < stop_at:
            await service.search(await service.text_vector(part[i % len(part)]), SearchOptions(k=11))
            i += 1
            if time.perf_counter() > stop_at - args.seconds:
                done[0] += 1

    sizes: list[int] = []

    async def main() -> int:
        service = IndexService(
            "bench", index, encoder, Limits(), lambda kind, n: sizes.append(n) if kind == "text" else 0
        )
        done = [0]
        stop_at = time.perf_counter() + args.warmup + args.seconds
        await asyncio.gather(*(caller(service, texts[c :: args.clients], stop_at, done) for c in range(args.clients)))
        await service.aclose()
        return done[0]

    qps = asyncio.run(main()) / args.seconds
    return qps, sum(sizes) / max(len(sizes), 1)


def text_batch_mean(port: int) -> float:
    """Mean queries per text-encoder batch since the server started, from its Prometheus metrics."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values = {}
    for line in text.splitlines():
        if line.startswith(("lipkit_batch_size_sum", "lipkit_batch_size_count")) and 'kind="text"' in line:
            values[line.split("{", 1)[0]] = float(line.rsplit(" ", 1)[1])
    return values.get("lipkit_batch_size_sum", 0.0) / max(values.get("lipkit_batch_size_count", 0.0), 1.0)


def alternate(port: int, index: Any, encoder: Any, args: argparse.Namespace) -> dict[str, Any]:
    """``--rounds`` rounds of HTTP then in-process, each side ``--seconds``: the machine's speed drifts over
    a minute (by a tenth here), and alternating puts both sides under the same drift. The ratio is of the
    queries answered over all rounds."""
    rounds = []
    for _ in range(args.rounds):
        row = measure_http(port, index.name, args)
        row["in_process_qps"], row["in_process_text_batch"] = measure_in_process(index, encoder, args)
        rounds.append(row)
    latencies = [v for r in rounds for v in r.pop("latencies")]
    return {
        "http_qps": float(np.mean([r["http_qps"] for r in rounds])),
        "in_process_qps": float(np.mean([r["in_process_qps"] for r in rounds])),
        "ratio": sum(r["http_qps"] for r in rounds) / sum(r["in_process_qps"] for r in rounds),
        "round_ratios": [round(r["http_qps"] / r["in_process_qps"], 3) for r in rounds],
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
        "http_errors": sum(r["http_errors"] for r in rounds),
        "http_text_batch": text_batch_mean(port),
        "in_process_text_batch": float(np.mean([r["in_process_text_batch"] for r in rounds])),
    }


def soak(port: int, index: Any, args: argparse.Namespace, token: str, before: int) -> dict[str, Any]:
    """The mixed load, then the count."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=soak_client, args=(port, index.name, token, seed, args.soak, index.record.embed_dim, queue))
        for seed in range(args.clients)
    ]
    for p in procs:
        p.start()
    reports = [queue.get(timeout=args.soak + 600) for _ in procs]
    for p in procs:
        p.join()
    added = {k for r in reports for k in r["added"]}
    deleted = {k for r in reports for k in r["deleted"]}
    errors = [e for r in reports for e in r["errors"]]
    kept = sorted(added - deleted)
    found = index.get(kept + sorted(deleted))
    lost = [k for k, m in zip(kept, found[: len(kept)], strict=True) if m is None]
    revived = [k for k, m in zip(sorted(deleted), found[len(kept) :], strict=True) if m is not None]
    expected = before + len(kept)
    return {
        "requests": sum(r["requests"] for r in reports),
        "added": len(added),
        "deleted": len(deleted),
        "errors": len(errors),
        "first_errors": errors[:3],
        "lost": len(lost),
        "revived": len(revived),
        "size": len(index),
        "expected_size": expected,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000, help="items in the index (default: 100000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per side and round (default: 5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of HTTP then in-process (default: 3)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of warm-up before measuring (default: 2)")
    parser.add_argument("--checkpoint", default="runs/quickstart/lit", help="the model (default: quickstart's LiT)")
    parser.add_argument("--model", default="tiny", help="config with random weights when there is no checkpoint")
    parser.add_argument(
        "--threads", type=int, default=2, help="torch and OpenMP (FAISS) threads (default: 2, the goal's cores)"
    )
    parser.add_argument(
        "--text-runtime",
        choices=("auto", "torch", "onnx"),
        default="auto",
        help="what encodes the queries, on both sides, as lipkit serve's option (default: auto, as lipkit serve)",
    )
    parser.add_argument("--soak", type=float, default=0.0, metavar="SECONDS", help="run the mixed soak instead")
    parser.add_argument("--json", help="append the results to this file as one JSON line")
    args = parser.parse_args()

    # OpenMP reads this when the libraries load, for every thread: FAISS searches on the server's threads
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from lipkit.serve.app import create_app

    encoder, model_note = load_model(args)
    print(f"model: {model_note}; embedding size {encoder.embed_dim}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        index = build_index(Path(tmp) / "bench", encoder, args.items)
        took = time.perf_counter() - start
        print(f"index: {len(index)} vectors near 1,000 phrases, {index.index_type} {index.params}, {took:.1f} s")
        token = "bench-token"
        app = create_app({index.name: (index, encoder)}, token=token)
        with Server(app) as server:
            if args.soak:
                row = soak(server.port, index, args, token, len(index))
            else:
                row = alternate(server.port, index, encoder, args)
        if args.soak:
            report_soak(row, args)
        else:
            report(row, args)
        index.close()
    row |= {"items": args.items, "clients": args.clients, "model": model_note, "index_type": index.index_type}
    row["text_runtime"] = encoder.text_runtime
    row |= {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus",
    }
    append_result(args.json, "search_server_soak" if args.soak else "search_server", row)
    failed = row.get("errors", row.get("http_errors", 0)) or row.get("lost") or row.get("revived")
    return 1 if failed or row.get("size") != row.get("expected_size") else 0


def report(row: dict[str, Any], args: argparse.Namespace) -> None:
    latency = f"p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f} ms"
    head = f"{args.clients} clients over HTTP: {row['http_qps']:.0f} q/s, {latency}"
    print(f"{head}, errors {row['http_errors']}, text batches of {row['http_text_batch']:.2f}")
    print(
        f"in-process, same batching, no HTTP: {row['in_process_qps']:.0f} q/s, "
        f"text batches of {row['in_process_text_batch']:.2f}"
    )
    rounds = ", ".join(f"{r:.2f}" for r in row["round_ratios"])
    goals = "goals: >= 300 q/s, p99 <= 100 ms, ratio >= 0.8"
    print(f"ratio http/in-process: {row['ratio']:.2f} (rounds: {rounds})  ({goals})")


def report_soak(row: dict[str, Any], args: argparse.Namespace) -> None:
    changes = f"{row['added']} added, {row['deleted']} deleted"
    print(f"soak {args.soak:.0f} s, {args.clients} clients: {row['requests']} requests, {changes}")
    print(f"errors {row['errors']} {row['first_errors'] or ''}; lost {row['lost']}; deleted but found {row['revived']}")
    verdict = "ok" if row["size"] == row["expected_size"] else "MISMATCH"
    print(f"index size {row['size']}, expected {row['expected_size']}: {verdict}")


if __name__ == "__main__":
    sys.exit(main())

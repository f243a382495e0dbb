"""Download throughput: ``lipkit data download`` against img2dataset on the same URL table, side by side.

Starts nginx on 127.0.0.1 (tests/nginx_server.py) serving real Tux Paint stamps re-encoded as JPEGs under
``/throttled/``, where each connection is sent at ``--throttle`` (a slow remote server: a 20 KB image takes
about 0.3 s at 64 KB/s), and writes a Parquet table of ``--urls`` distinct URLs (the images repeat, each URL
with its own query string). Both tools fetch the whole table into webdataset shards, with no resizing, the
same number of processes and threads per process, and the same timeout; the script prints images/s for
each (successes over wall time), the ratio, and whether both fetched the same set of URLs.

img2dataset runs from its own virtual environment (it pins packages lipkit's does not share):
``python -m venv /tmp/i2d && /tmp/i2d/bin/pip install img2dataset``, then ``--img2dataset /tmp/i2d/bin/img2dataset``.

Run: ``PYTHONPATH=src python benchmarks/download.py --urls 5000 --img2dataset /tmp/i2d/bin/img2dataset``
"""

from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from results import append_result

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from nginx_server import Nginx  # noqa: E402

STAMPS = Path("/usr/share/tuxpaint/stamps")


def serve_images(server: Nginx, count: int) -> list[str]:
    """Real images as JPEGs under /throttled/; their paths."""
    names = []
    for path in sorted(STAMPS.rglob("*.png"))[:count]:
        buf = io.BytesIO()
        Image.open(path).convert("RGB").save(buf, "JPEG", quality=85)
        names.append(f"throttled/{path.stem}.jpg")
        server.put(names[-1], buf.getvalue())
    return names


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--urls", type=int, default=5000, help="URLs in the table (default: 5000)")
    parser.add_argument("--images", type=int, default=500, help="distinct images behind them (default: 500)")
    parser.add_argument("--throttle", default="64k", help="nginx limit_rate per connection (default: 64k)")
    parser.add_argument("--processes", type=int, default=2, help="processes for each tool (default: 2)")
    parser.add_argument("--threads", type=int, default=32, help="threads per process for each tool (default: 32)")
    parser.add_argument("--samples-per-shard", type=int, default=1000, help="default: 1000")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per request (default: 10)")
    parser.add_argument("--img2dataset", default="img2dataset", help="the img2dataset command (default: on PATH)")
    parser.add_argument("--skip-img2dataset", action="store_true", help="time lipkit alone")
    parser.add_argument("--json", help="append the result to this JSON-lines file")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from lipkit.data.download import DownloadOptions, download, read_url_table, status_table

    server = Nginx(throttle=args.throttle)
    work = Path(tempfile.mkdtemp(prefix="lipkit-download-bench-"))
    try:
        names = serve_images(server, args.images)
        urls = [f"{server.url}/{names[i % len(names)]}?n={i}" for i in range(args.urls)]
        table = work / "urls.parquet"
        pq.write_table(pa.table({"url": urls, "caption": [f"image {i}" for i in range(args.urls)]}), table)

        options = DownloadOptions(
            samples_per_shard=args.samples_per_shard, processes=args.processes, threads=args.threads,
            per_host=args.threads, timeout=args.timeout, retries=0,
        )  # fmt: skip
        start = time.perf_counter()
        result = download(read_url_table(table), work / "lipkit", options, progress=False)
        seconds = {"lipkit": time.perf_counter() - start}
        ok = {"lipkit": {r["url"] for r in status_table(work / "lipkit").to_pylist() if r["status"] == "success"}}
        assert len(ok["lipkit"]) == result.successes
        if not args.skip_img2dataset:
            cmd = [
                args.img2dataset, "--url_list", str(table), "--input_format", "parquet", "--url_col", "url",
                "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(work / "i2d"),
                "--processes_count", str(args.processes), "--thread_count", str(args.threads),
                "--number_sample_per_shard", str(args.samples_per_shard), "--resize_mode", "no",
                "--timeout", str(int(args.timeout)), "--retries", "0", "--enable_wandb", "False",
                "--distributor", "multiprocessing",
            ]  # fmt: skip
            start = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            seconds["img2dataset"] = time.perf_counter() - start
            if done.returncode:
                raise SystemExit(f"img2dataset failed:\n{done.stderr[-2000:]}")
            rows = pa.concat_tables([pq.read_table(p) for p in sorted((work / "i2d").glob("*.parquet"))]).to_pylist()
            ok["img2dataset"] = {r["url"] for r in rows if r["status"] == "success"}
        print(f"{args.urls} URLs ({args.images} images, {args.throttle}/s per connection), "
              f"{args.processes} processes x {args.threads} threads")  # fmt: skip
        rate = {name: len(ok[name]) / seconds[name] for name in seconds}
        for name in seconds:
            print(f"{name:12s} {len(ok[name]):6d} fetched in {seconds[name]:7.1f} s: {rate[name]:8.1f} images/s")
        if "img2dataset" in rate:
            print(f"ratio lipkit/img2dataset {rate['lipkit'] / rate['img2dataset']:.2f}x")
            print(f"same successes: {ok['lipkit'] == ok['img2dataset']}")
        append_result(args.json, "download", {
            "urls": args.urls, "throttle": args.throttle, "processes": args.processes, "threads": args.threads,
            "images_per_s": rate, "successes": {k: len(v) for k, v in ok.items()},
        })  # fmt: skip
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

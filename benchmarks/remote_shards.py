"""Loader throughput from remote shards against the same shards on local disk, side by side.

Packs ``--images`` JPEGs of 512-1024 px (benchmarks/loader.py's images) into shards, serves the folder with
nginx on 127.0.0.1 (tests/nginx_server.py: range requests), and measures images/s of lipkit's training
loader (random access through the tar index, draft decoding, ViT-B-32's transform, tokenising, batching)
over the local pattern and over the ``http://`` pattern, with ``--workers`` loader processes. Remote
shards are read as lipkit reads them (each batch's samples fetched together, one range request each, all in
flight at once) and, for comparison, one sample at a time (``remote, unprefetched``: the prefetch turned
off). Rounds alternate; the median is reported with the ratios to local disk.

On plain loopback the network costs little, and the gap shows what lipkit's remote reading itself costs
per sample. ``--throttle RATE`` serves the shards at RATE per connection (nginx ``limit_rate``, e.g.
``2m``): a store far away, where each request takes tens of milliseconds and only concurrency keeps the
loader fed.

Run: ``PYTHONPATH=src python benchmarks/remote_shards.py --images 512 --workers 2 [--throttle 2m]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from lipkit.data.loader import make_train_loader
from lipkit.data.pack import PackOptions, pack
from lipkit.data.pairs import PairSource
from lipkit.data.shards import ShardPairs
from lipkit.data.spec import open_mixture
from lipkit.models import get_model_config, get_tokenizer, image_transform
from lipkit.models.factory import preprocess_config
from loader import make_images
from results import append_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nginx_server import Nginx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="images in the shards (default: 512)")
    parser.add_argument("--shards", type=int, default=4, help="default: 4")
    parser.add_argument("--batch-size", type=int, default=32, help="default: 32")
    parser.add_argument("--workers", type=int, default=2, help="loader processes (default: 2)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds; the median is reported")
    parser.add_argument("--model", default="ViT-B-32", help="model whose transform is used (default ViT-B-32)")
    parser.add_argument("--throttle", help="serve at this rate per connection (nginx limit_rate, e.g. 2m)")
    parser.add_argument("--json", help="append the result to this JSON-lines file")
    args = parser.parse_args()
    torch.set_num_threads(1)

    server = Nginx(throttle=args.throttle or "64k")
    folder = "throttled/bench" if args.throttle else "bench"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            os.environ["LIPKIT_CACHE_DIR"] = str(root / "cache")
            (root / "images").mkdir()
            items = make_images(root / "images", args.images)
            per_shard = -(-args.images // args.shards)
            pack(items, root / "shards", PackOptions(samples_per_shard=per_shard), progress=False)
            shards = sorted((root / "shards").glob("*.tar"))
            for path in shards:
                server.put(f"{folder}/{path.name}", path.read_bytes())
            braces = f"{{00000..{len(shards) - 1:05d}}}.tar"
            remote = f"{server.url}/{folder}/{braces}"
            patterns = {"local": f"{root}/shards/{braces}", "remote": remote, "remote, unprefetched": remote}
            transform, tokenize = image_transform(args.model), get_tokenizer(args.model)
            side = preprocess_config(get_model_config(args.model)).image_size
            steps = args.images // args.batch_size

            prefetch = ShardPairs.prefetch

            def run(name: str) -> float:
                pattern = patterns[name]
                # the comparison row: forked workers inherit the class without its prefetch
                ShardPairs.prefetch = PairSource.prefetch if name.endswith("unprefetched") else prefetch
                start = time.perf_counter()
                loader = make_train_loader(
                    open_mixture(pattern), transform, tokenize, args.batch_size, seed=0, num_steps=steps,
                    workers=args.workers, draft=(side, side),
                )  # fmt: skip
                count = sum(images.shape[0] for images, _ in loader)
                return count / (time.perf_counter() - start)

            for name in ("local", "remote"):  # warm-up: the indexes, the page cache
                run(name)
            rates: dict[str, list[float]] = {name: [] for name in patterns}
            for _ in range(args.rounds):
                for name in patterns:
                    rates[name].append(run(name))
    finally:
        ShardPairs.prefetch = prefetch
        server.stop()
    med = {name: statistics.median(r) for name, r in rates.items()}
    served = f"served at {args.throttle}/s per connection" if args.throttle else "served on loopback"
    print(f"{args.images} JPEGs of 512-1024 px in {args.shards} shards ({served}), {args.model} transform, "
          f"{args.workers} loader processes, batch {args.batch_size}")  # fmt: skip
    for name in patterns:
        print(f"{name:21s} {med[name]:8.1f} images/s (rounds: {', '.join(f'{r:.1f}' for r in rates[name])})")
    print(f"ratio remote/local {med['remote'] / med['local']:.2f}x, "
          f"unprefetched/local {med['remote, unprefetched'] / med['local']:.2f}x, "
          f"prefetch gain {med['remote'] / med['remote, unprefetched']:.2f}x")  # fmt: skip
    row = {"images": args.images, "workers": args.workers, "throttle": args.throttle, "images_per_s": med}
    append_result(args.json, "remote_shards", row)


if __name__ == "__main__":
    main()

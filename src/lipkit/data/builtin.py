"""Built-in corpora, packed into shards from Debian packages that hold real data (no downloads).

Image-caption corpora (``lipkit data builtin NAME --out-dir DIR`` writes ``DIR/{train,val,test}/*.tar`` in
img2dataset's layout, split by a hash of each item's key with :func:`~lipkit.data.pairs.split_of`):

* ``tuxpaint``: ~785 Tux Paint stamps (``tuxpaint-stamps-default``, GPL-2); the caption is the English
  line, and the JSON keeps every translation as ``captions: {lang: text}``.
* ``emoji``: ~1,350 single-codepoint emoji rendered from Noto Color Emoji (``fonts-noto-color-emoji``,
  OFL), captioned by their Unicode names ("dog face").
* ``openclipart``: ~8,100 OpenClipart drawings (``openclipart-svg``, public domain) rasterised with
  cairosvg, or the pre-rendered ``openclipart-png``; the title is the caption, the description and
  tags go into the JSON.

Labelled evaluation sets (``fashion-mnist``, ``mnist``) are written by :func:`write_labelled` in
CLIP_benchmark's webdataset layout instead.
"""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from tqdm.auto import tqdm

from lipkit.data.corpora import (
    EMOJI_FONT,
    TUXPAINT_ROOT,
    emoji_codepoints,
    emoji_key,
    render_emoji,
    tuxpaint_captions,
    tuxpaint_stamps,
)
from lipkit.data.decode import UndecodableImage, encode_image
from lipkit.data.pack import Decoded, FileImage, Item, PackOptions, PackResult, add_member, pack
from lipkit.data.pairs import SPLITS, split_of
from lipkit.errors import LipkitError
from lipkit.registry import Registry
from lipkit.utils import FolderLock, atomic_write, atomic_write_text, strict_json

CORPORA: Registry[Callable[..., list[Item]]] = Registry("built-in corpus")
LABELLED_SETS = ("fashion-mnist", "mnist")
OPENCLIPART_SVG = Path("/usr/share/openclipart/svg")
OPENCLIPART_PNG = Path("/usr/share/openclipart/png")
SVG_SIDE = 512  # rasterising size of SVGs when no max side is given
CAIROSVG_INSTALL = "pip install cairosvg"


@dataclass(frozen=True)
class EmojiImage:
    """One emoji, rendered when loaded."""

    codepoint: int
    font: Path = EMOJI_FONT

    def load(self, max_side: int | None) -> Decoded:
        img = render_emoji(chr(self.codepoint), self.font)
        return Decoded(img, img.size)


@dataclass(frozen=True)
class SvgImage:
    """An SVG drawing, rasterised with cairosvg so that its longer side is ``max_side`` (default 512)."""

    path: Path

    def load(self, max_side: int | None) -> Decoded:
        import cairosvg

        side = max_side or SVG_SIDE
        try:
            img = _rasterise(cairosvg, self.path, {"output_width": side})
            if img.height > side:
                img = _rasterise(cairosvg, self.path, {"output_height": side})
        except Exception as exc:  # cairosvg raises many error types on malformed drawings
            raise UndecodableImage(f"{self.path}: {type(exc).__name__}: {exc}") from None
        return Decoded(img, img.size)


def _rasterise(cairosvg: Any, path: Path, size: dict[str, int]) -> Image.Image:
    img = Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), **size)))
    img.load()
    return img


def _require(root: Path, package: str) -> None:
    if not root.is_dir():
        raise LipkitError(f"{root} not found; install it with `apt-get install {package}`")


@CORPORA.register("tuxpaint")
def tuxpaint_items(limit: int | None = None, root: Path = TUXPAINT_ROOT) -> list[Item]:
    """Tux Paint stamps (the first ``limit``) with all their captions; those without one are counted when packing."""
    _require(root, "tuxpaint-stamps-default")
    items = []
    for png in tuxpaint_stamps(root)[:limit]:
        key = str(png.relative_to(root).with_suffix(""))
        captions, fell_back = tuxpaint_captions(png.with_suffix(".txt"))
        meta = {"captions": captions, "category": key.split("/")[0]}
        items.append(Item(key, captions.get("en"), FileImage(png), meta, fell_back))
    return items


@CORPORA.register("emoji")
def emoji_items(limit: int | None = None, font: Path = EMOJI_FONT) -> list[Item]:
    """The single-codepoint emoji of Noto Color Emoji (the first ``limit``), captioned by their Unicode names."""
    import unicodedata

    return [
        Item(emoji_key(cp), unicodedata.name(chr(cp)).lower(), EmojiImage(cp, font), {"codepoint": f"U+{cp:04X}"})
        for cp in emoji_codepoints(font)[:limit]
    ]


@CORPORA.register("openclipart")
def openclipart_items(
    limit: int | None = None, svg_root: Path = OPENCLIPART_SVG, png_root: Path = OPENCLIPART_PNG
) -> list[Item]:
    """OpenClipart drawings (the first ``limit``) with their metadata (from the SVGs), rasterised with cairosvg.

    Without cairosvg, the pre-rendered images of ``openclipart-png`` are used when that is installed.
    """
    _require(svg_root, "openclipart-svg")
    svgs = sorted(svg_root.rglob("*.svg"))[:limit]
    if _has_cairosvg():
        return [_clipart_item(svg, svg_root, SvgImage(svg)) for svg in svgs]
    if png_root.is_dir():
        return [
            _clipart_item(svg, svg_root, FileImage(png_root / svg.relative_to(svg_root).with_suffix(".png")))
            for svg in svgs
        ]
    raise LipkitError(
        f"rasterising OpenClipart's SVGs needs cairosvg; install it with `{CAIROSVG_INSTALL}` "
        "(or `apt-get install openclipart-png` for pre-rendered images)"
    )


def _has_cairosvg() -> bool:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError):  # OSError: the cairo library itself is missing
        return False
    return True


def _clipart_item(svg: Path, root: Path, image: Any) -> Item:
    relative = svg.relative_to(root)
    title, description, tags = svg_metadata(svg)
    meta = {"description": description, "tags": tags, "category": relative.parts[0]}
    return Item("openclipart/" + str(relative.with_suffix("")), title, image, meta)


def svg_metadata(path: Path) -> tuple[str | None, str, list[str]]:
    """The title, description and keyword tags of an SVG's RDF metadata (``dc:title`` of the ``cc:Work``)."""
    try:
        with open(path, "rb") as f:
            for _, elem in ET.iterparse(f, events=("end",)):
                if elem.tag.endswith("}metadata"):
                    work = elem.find(".//{*}Work")
                    break
            else:
                return None, "", []
    except (OSError, ET.ParseError):
        return None, "", []
    if work is None:
        return None, "", []

    def text(tag: str) -> str:
        node = work.find(f"{{*}}{tag}")
        return " ".join((node.text or "").split()) if node is not None else ""

    tags = [" ".join((li.text or "").split()) for li in work.findall("{*}subject//{*}li")]
    return text("title") or None, text("description"), [t for t in tags if t]


def pack_corpus(
    name: str, out: str | Path, options: PackOptions, limit: int | None = None, progress: bool = True
) -> dict[str, PackResult]:
    """Pack a built-in corpus into ``out/{train,val,test}``, split by key hash; resumable like :func:`pack`.

    Args:
        name: A registered corpus (``tuxpaint``, ``emoji``, ``openclipart``).
        out: Output folder.
        options: Packing options.
        limit: Keep only the first ``limit`` items (in key order) before splitting, for quick builds.
        progress: Show progress bars.
    """
    items = CORPORA.get(name)(limit)
    out = Path(out)
    results = {}
    with FolderLock(out, f"building the {name} corpus"):
        for split in SPLITS:
            chosen = [item for item in items if split_of(item.source) == split]
            if chosen:
                results[split] = pack(chosen, out / split, options, progress)
        summary = {"corpus": name, "items": len(items), "splits": {s: r.successes for s, r in results.items()}}
        atomic_write_text(out / "corpus.json", strict_json(summary, indent=1) + "\n")
    return results


def write_labelled(
    data: Any,
    out: str | Path,
    split: str,
    templates: Sequence[str],
    samples_per_shard: int = 10_000,
    progress: bool = True,
) -> int:
    """Write a labelled set in CLIP_benchmark's webdataset layout; returns the number of shards.

    Layout: ``out/classnames.txt``, ``out/zeroshot_classification_templates.txt`` and
    ``out/SPLIT/{0,1,...}.tar`` plus ``out/SPLIT/nshards.txt``; sample ``i`` is ``s{i:07d}.png``,
    ``s{i:07d}.cls`` (the class index) and ``s{i:07d}.txt`` (the class name).

    Args:
        data: A labelled set (``classnames``, ``len``, ``image(i)``, ``label(i)``), e.g. from
            :func:`lipkit.data.labelled.open_labelled`.
        out: The dataset folder.
        split: The split folder to write.
        templates: Zero-shot prompt templates with a ``{c}`` placeholder.
        samples_per_shard: Samples per tar.
        progress: Show a progress bar.
    """
    out = Path(out)
    with FolderLock(out, f"writing a labelled set ({split})"):
        atomic_write_text(out / "classnames.txt", "\n".join(data.classnames) + "\n")
        atomic_write_text(out / "zeroshot_classification_templates.txt", "\n".join(templates) + "\n")
        starts = range(0, len(data), samples_per_shard)
        bar = tqdm(starts, desc=f"writing {out / split}", unit="shard", disable=not progress)
        for shard, start in enumerate(bar):
            indices = range(start, min(start + samples_per_shard, len(data)))
            path = out / split / f"{shard}.tar"
            atomic_write(path, lambda f, ix=indices: _fill_labelled(f, data, ix))
            path.chmod(0o644)
        atomic_write_text(out / split / "nshards.txt", f"{len(starts)}\n")
    return len(starts)


def _fill_labelled(f: io.BufferedWriter, data: Any, indices: range) -> None:
    import tarfile

    with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for i in indices:
            label = data.label(i)
            entries = {
                "png": encode_image(data.image(i), "png"),
                "cls": str(label).encode(),
                "txt": data.classnames[label].encode("utf-8"),
            }
            for ext, payload in entries.items():
                add_member(tar, f"s{i:07d}.{ext}", payload)

"""Locked-tower (LiT) training on cached features: frozen trunks run once, then only the heads train.

When both towers' trunks are frozen, their outputs for a sample never change, so they are computed
once (with the evaluation transform), saved on disk under a key made of both trunks' weights and
configs, the preprocessing, and the data's keys and captions, and reused by every later run: a re-run
skips straight to training the projection heads, which takes seconds. Each source of a mixture is an
entry of its own, so a new mixture of sources cached before computes nothing, and a key subset of a
source (``{source: ..., keys: FILE}``, a curated key list) is cut out of its whole source's entries when
those are cached. Batches are drawn by the same
deterministic sampler as image batches, so resuming stays exact.

With ``feature_views > 1``, augmented views of the training images are cached too (view 0 is the
evaluation transform; view ``v > 0`` is a draw of the training transform seeded by ``v`` and the
sample's key), each view a cache entry of its own, and each step picks one view per sample from the
sample's seed: augmentation at the cost of a few extra trunk passes, not one per step.

A source of classifier prototypes (:mod:`lipkit.data.prototypes`) in the mixture has no images: its
image features are its placed head rows (the same for every view), computed from the image tower's
classifier and the cached features of the other sources' images, and its captions are cached through
the text trunk on their own; the image sources keep the cache entry they have without the prototypes.
Without the cache (the image trunk locked, the rest training), :func:`place_prototypes` places the rows
once, from the evaluation-view features of up to 4,096 evenly spaced training images.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from lipkit.cache import cached, load_cached, try_save_cached
from lipkit.config import to_dict
from lipkit.data.loader import ResumableBatchSampler, TransformedPairs
from lipkit.data.pairs import PairSource, prefetch
from lipkit.data.prototypes import REFERENCE_IMAGES, PrototypePairs, tower_head
from lipkit.data.spec import ConcatPairs, KeySubset, Mixture
from lipkit.errors import ConfigError
from lipkit.models import DualEncoder, get_tokenizer, image_transform
from lipkit.models.text_inputs import TextCache
from lipkit.utils import cache_root, update_digest


def default_cache_dir() -> Path:
    """``$LIPKIT_CACHE_DIR/features``, else ``~/.cache/lipkit/features``."""
    return cache_root() / "features"


def check_lockable(model: DualEncoder) -> None:
    """Feature caching needs both trunks frozen; otherwise their outputs change during training."""
    if not (model.cfg.lock_image and model.cfg.lock_text):
        raise ConfigError(
            "cache_features needs both towers locked: set model_overrides.lock_image=true and "
            "model_overrides.lock_text=true (or use a LiT config such as lit-effnet-minilm)"
        )


HEAD_KEYS = ("proj", "proj_bias")  # the projection heads train; cached trunk features do not depend on them
RUN_KEYS = ("fold_batchnorm",)  # how a trunk runs, not what it computes (equal to rounding): not in the key

# preprocessing that only augmented views use
TRAIN_ONLY = ("train_scale", "train_ratio", "train_grayscale", "train_lowres", "train_lowres_size", "train_invert")


def cache_key(model: DualEncoder, source: PairSource, view: int = 0) -> str:
    """A digest of everything the cached features depend on (trunk weights, configs, data, cut layer).

    View 0 (the evaluation transform, both towers) ignores the training-only preprocessing; an augmented
    view ``v > 0`` (image features only) depends on the image tower, all the preprocessing and ``v``.
    """
    h = hashlib.sha256()
    cfg = to_dict(model.cfg)
    towers = [{k: v for k, v in cfg[t].items() if k not in HEAD_KEYS + RUN_KEYS} for t in ("vision", "text")]
    if view == 0:
        preprocess = {k: v for k, v in cfg["preprocess"].items() if k not in TRAIN_ONLY}
        parts = [*towers, preprocess, cfg["tokenizer"], model.text_cache_layer()]
    else:
        parts = [towers[0], cfg["preprocess"], {"augmented_view": view}]
    h.update(json.dumps(parts, sort_keys=True).encode())
    update_digest(h, model.visual, skip_prefix="proj.")
    if view == 0:
        update_digest(h, model.text, skip_prefix="proj.")
    for i in range(len(source)):
        h.update(f"{source.key(i)}\t{source.caption(i)}\n".encode())
    return h.hexdigest()[:24]


def view_seed(view: int, key: str) -> int:
    """The augmentation seed of ``view`` of the sample with ``key``: fixed, whatever the order or workers."""
    return int.from_bytes(hashlib.sha256(f"{view}|{key}".encode()).digest()[:8], "little") >> 1


class AugmentedView(Dataset):
    """``index`` -> the training transform of image ``index``, seeded by :func:`view_seed`."""

    def __init__(self, source: PairSource, transform: Any, view: int) -> None:
        self.source, self.transform, self.view = source, transform, view

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, indexes: list[int]) -> list[torch.Tensor]:
        """A batch (the DataLoader's batched fetch): the source fetches its reads ahead together."""
        prefetch(self.source, indexes)
        return [self[index] for index in indexes]

    def __getitem__(self, index: int) -> torch.Tensor:
        torch.default_generator.manual_seed(view_seed(self.view, self.source.key(index)))
        return self.transform(self.source.image(index))


def _rows(data: Dataset, rows: range | None) -> Dataset:
    """``data`` itself, or the rows of it that this process computes."""
    return data if rows is None else Subset(data, rows)


def _pad_cat(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate (B, T, ...) chunks along B, zero-padding T to the longest."""
    length = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, 0) * (c.ndim - 2) + (0, length - c.shape[1])) for c in chunks])


@torch.no_grad()
def _compute(
    model: DualEncoder,
    source: PairSource,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool,
    rows: range | None = None,
) -> dict[str, torch.Tensor]:
    tokenizer = get_tokenizer(model.cfg)
    data = TransformedPairs(source, image_transform(model.cfg))
    loader = DataLoader(_rows(data, rows), batch_size=batch_size, num_workers=workers)
    was_training = model.training
    model.eval()
    layer = model.text_cache_layer()
    images, texts, aux = [], [], []
    for batch_images, captions in tqdm(loader, desc="caching frozen features", unit="batch", disable=not progress):
        images.append(model.visual.features(batch_images.to(device)).float().cpu())
        _encode_text(model, tokenizer(list(captions)).to(device), layer, texts, aux)
    model.train(was_training)
    return {"image": torch.cat(images), **_text_entry(texts, aux)}


def _encode_text(model: DualEncoder, tokens: Any, layer: int | None, texts: list, aux: list) -> None:
    """Append the text trunk's output for ``tokens`` (pooled features, or states and their tokens)."""
    if layer is None:
        texts.append(model.text.features(tokens).float().cpu())
    else:
        states = model.text.trim(model.text.hidden(tokens, layer))
        texts.append(states.features.float().cpu())
        aux.append(states.tokens.cpu())


def _text_entry(texts: list[torch.Tensor], aux: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text part of a cache entry: ``text`` (pooled) or ``text_hidden`` and ``text_aux`` (states)."""
    if not aux:
        return {"text": torch.cat(texts)}
    return {"text_hidden": _pad_cat(texts), "text_aux": _pad_cat(aux)}


@torch.no_grad()
def _compute_text(
    model: DualEncoder, captions: list[str], batch_size: int, device: torch.device, rows: range | None = None
) -> dict[str, torch.Tensor]:
    """The text trunk's output for ``captions`` (the ``rows`` of them), as a cache entry."""
    tokenizer, layer = get_tokenizer(model.cfg), model.text_cache_layer()
    chosen = captions if rows is None else [captions[i] for i in rows]
    was_training = model.training
    model.eval()
    texts: list[torch.Tensor] = []
    aux: list[torch.Tensor] = []
    for start in range(0, len(chosen), batch_size):
        _encode_text(model, tokenizer(chosen[start : start + batch_size]).to(device), layer, texts, aux)
    model.train(was_training)
    return _text_entry(texts, aux)


def text_cache_key(model: DualEncoder, source: PairSource) -> str:
    """A digest of what the text trunk's outputs for ``source``'s captions depend on."""
    h = hashlib.sha256()
    cfg = to_dict(model.cfg)
    text = {k: v for k, v in cfg["text"].items() if k not in HEAD_KEYS + RUN_KEYS}
    h.update(json.dumps(["text-only", text, cfg["tokenizer"], model.text_cache_layer()], sort_keys=True).encode())
    update_digest(h, model.text, skip_prefix="proj.")
    for i in range(len(source)):
        h.update(f"{source.caption(i)}\n".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def _compute_view(
    model: DualEncoder,
    source: PairSource,
    view: int,
    batch_size: int,
    workers: int,
    device: torch.device,
    progress: bool,
    rows: range | None = None,
) -> dict[str, torch.Tensor]:
    data = _rows(AugmentedView(source, image_transform(model.cfg, train=True), view), rows)
    desc = f"caching augmented view {view}"
    return {"image": _image_features(model, data, batch_size, workers, device, desc, progress)}


def _image_features(
    model: DualEncoder,
    data: Dataset,
    batch_size: int,
    workers: int,
    device: torch.device | str,
    desc: str,
    progress: bool,
) -> torch.Tensor:
    """The image trunk's features (N, F) of ``data`` (images, or (image, caption) pairs), in eval mode."""
    loader = DataLoader(data, batch_size=batch_size, num_workers=workers)
    was_training = model.training
    model.eval()
    chunks = []
    for batch in tqdm(loader, desc=desc, unit="batch", disable=not progress):
        images = batch[0] if isinstance(batch, (list, tuple)) else batch
        chunks.append(model.visual.features(images.to(device)).float().cpu())
    model.train(was_training)
    return torch.cat(chunks)


def cached_features(
    model: DualEncoder,
    source: PairSource,
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    workers: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = True,
    views: int = 1,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[torch.Tensor, TextCache]:
    """Frozen-trunk features of every pair, from disk if cached.

    Across processes (``world_size > 1``, a process group joined), every process calls this: when an
    entry is missing on any of them, each computes a contiguous share of the pairs, the shares are
    gathered so that every process holds all features, and rank 0 writes the entry.

    Args:
        views: Image views per pair: the evaluation view, then ``views - 1`` augmented ones.
        rank: This process's rank.
        world_size: The number of processes sharing the work.

    Returns:
        The image features, (N, F_image) for one view or (N, views, F_image), and the text trunk's
        output (see :class:`TextCache`).
    """
    check_lockable(model)
    # Computing features iterates DataLoaders, which draw from the global random state; a run must train
    # the same whether its features were computed now or read from the cache (dropout in unlocked layers).
    with torch.random.fork_rng(devices=[]):
        share = _Share(rank, world_size, len(source))
        progress = progress and rank == 0
        return _cached_features(model, source, cache_dir, batch_size, workers, device, progress, views, share)


@dataclass(frozen=True)
class _Share:
    """This process's part in computing a cache entry: rows ``[rank * n // world, (rank + 1) * n // world)``."""

    rank: int
    world_size: int
    n: int

    def cached(
        self,
        path: Path,
        compute: Callable[[range | None], dict[str, torch.Tensor]],
        check: Callable[[dict[str, torch.Tensor]], bool],
    ) -> dict[str, torch.Tensor]:
        """:func:`lipkit.cache.cached`, with the computation split over the processes."""
        if self.world_size == 1:
            return cached(path, lambda: compute(None), check)
        if self.n < self.world_size:
            raise ConfigError(f"{self.n} training pairs cannot be shared by {self.world_size} processes")
        payload = load_cached(path, check)
        found: list[bool | None] = [None] * self.world_size
        dist.all_gather_object(found, payload is not None)  # all compute, or none: a collective decision
        if all(found):
            return payload
        rows = range(self.rank * self.n // self.world_size, (self.rank + 1) * self.n // self.world_size)
        shares: list[dict[str, torch.Tensor] | None] = [None] * self.world_size
        dist.all_gather_object(shares, compute(rows))
        payload = {key: _pad_cat([part[key] for part in shares]) for key in shares[0]}
        if self.rank == 0:
            try_save_cached(path, payload)
        return payload


def _cached_features(
    model: DualEncoder,
    source: PairSource,
    cache_dir: str | Path | None,
    batch_size: int,
    workers: int,
    device: torch.device | str,
    progress: bool,
    views: int,
    share: _Share,
) -> tuple[torch.Tensor, TextCache]:
    def pairs(images: list[PairSource]) -> tuple[torch.Tensor, TextCache]:
        """The sources' features joined, each source its own cache entry: a new mixture of sources that
        were cached before computes nothing."""
        got = []
        for part in images:
            mine = _Share(share.rank, share.world_size, len(part))
            args = (cache_dir, batch_size, workers, device, progress, views, mine)
            got.append(_cached_pair_features(model, part, *args))
        if len(got) == 1:
            return got[0]
        joined = (_join([getattr(t, name) for _, t in got]) for name in ("features", "tokens"))
        return torch.cat([image for image, _ in got]), TextCache(*joined)

    def texts(part: PairSource) -> TextCache:
        return _cached_text(model, part, cache_dir, batch_size, torch.device(device), share)

    parts = source.sources if isinstance(source, ConcatPairs) else [source]
    if not any(isinstance(p, PrototypePairs) for p in parts):
        return pairs(parts)
    return _with_prototypes(model, parts, pairs, texts)


def _with_prototypes(
    model: DualEncoder,
    parts: list[PairSource],
    pairs: Callable[[list[PairSource]], tuple[torch.Tensor, TextCache]],
    texts: Callable[[PairSource], TextCache],
) -> tuple[torch.Tensor, TextCache]:
    """Features of a mixture with prototype sources: the image sources' cached ones (their entries as
    without the prototypes) and each prototype source's placed rows and cached caption features, in order."""
    images = [p for p in parts if not isinstance(p, PrototypePairs)]
    if not images:
        raise ConfigError("prototype sources need image sources beside them: their placement uses the images' features")
    image, text = pairs(images)
    head = tower_head(model.visual)
    reference = image if image.ndim == 2 else image[:, 0]  # the evaluation view of every training image
    image_parts, text_parts, start = [], [], 0
    for part in parts:
        if isinstance(part, PrototypePairs):
            rows = part.features(head, reference)  # (n, F), the same for every view
            image_parts.append(rows if image.ndim == 2 else rows[:, None].expand(-1, image.shape[1], -1))
            text_parts.append(texts(part))
        else:
            image_parts.append(image[start : start + len(part)])
            text_parts.append(text[start : start + len(part)])
            start += len(part)
    joined = (_join([getattr(t, name) for t in text_parts]) for name in ("features", "tokens"))
    return torch.cat(image_parts), TextCache(*joined)


def place_prototypes(
    model: DualEncoder,
    sources: list[PairSource],
    device: torch.device | str = "cpu",
    workers: int = 0,
    batch_size: int = 64,
    limit: int = REFERENCE_IMAGES,
) -> None:
    """Place the rows of every prototype source among ``sources``, for training without the feature cache.

    The reference features are the locked image trunk's, in the evaluation view, of up to ``limit``
    evenly spaced images of the other sources (every rank computes the same ones).

    Raises:
        ConfigError: Prototype sources without image sources beside them.
        LipkitError: The image tower has no classifier head, or its head does not fit the class names.
    """
    prototypes = [s for s in sources if isinstance(s, PrototypePairs)]
    if not prototypes:
        return
    images = [s for s in sources if not isinstance(s, PrototypePairs)]
    if not images:
        raise ConfigError("prototype sources need image sources beside them: their placement uses the images' features")
    joined = images[0] if len(images) == 1 else ConcatPairs(images)
    n = len(joined)
    picks = list(range(n)) if n <= limit else [i * n // limit for i in range(limit)]
    data = Subset(TransformedPairs(joined, image_transform(model.cfg)), picks)
    with torch.random.fork_rng(devices=[]), torch.no_grad():  # a resumed run draws the same random numbers
        reference = _image_features(model, data, batch_size, workers, device, "placing prototypes", progress=False)
    head = tower_head(model.visual)
    for part in prototypes:
        part.place_rows(head, reference)


def _join(chunks: list[torch.Tensor | None]) -> torch.Tensor | None:
    """Concatenate cached text chunks (padding token positions to the longest); ``None`` fields stay ``None``."""
    return None if chunks[0] is None else _pad_cat(chunks)


def _cached_text(
    model: DualEncoder,
    source: PairSource,
    cache_dir: str | Path | None,
    batch_size: int,
    device: torch.device,
    share: _Share,
) -> TextCache:
    """The text trunk's output for ``source``'s captions, from disk if cached."""
    folder = Path(cache_dir or default_cache_dir())
    captions = [source.caption(i) for i in range(len(source))]
    saved = _Share(share.rank, share.world_size, len(source)).cached(
        folder / f"text-{text_cache_key(model, source)}.pt",
        lambda rows: _compute_text(model, captions, batch_size, device, rows),
        lambda entry: (
            all(t.shape[0] == len(source) for t in entry.values())
            and ("text" in entry) == (model.text_cache_layer() is None)
        ),
    )
    return TextCache(saved["text"]) if "text" in saved else TextCache(saved["text_hidden"], saved["text_aux"])


def _cached_pair_features(
    model: DualEncoder,
    source: PairSource,
    cache_dir: str | Path | None,
    batch_size: int,
    workers: int,
    device: torch.device | str,
    progress: bool,
    views: int,
    share: _Share,
) -> tuple[torch.Tensor, TextCache]:
    folder = Path(cache_dir or default_cache_dir())
    n, device = len(source), torch.device(device)
    if isinstance(source, KeySubset):
        cut = _cut_from_whole_source(model, source, folder, views, share)
        if cut is not None:
            return cut

    def sound(saved: dict[str, torch.Tensor]) -> bool:
        return all(t.shape[0] == n for t in saved.values()) and ("text" in saved) == (model.text_cache_layer() is None)

    saved = share.cached(
        folder / f"{cache_key(model, source)}.pt",
        lambda rows: _compute(model, source, batch_size, workers, device, progress, rows),
        sound,
    )
    image = saved["image"]
    if views > 1:
        extra = [
            share.cached(
                folder / f"{cache_key(model, source, v)}.pt",
                lambda rows, v=v: _compute_view(model, source, v, batch_size, workers, device, progress, rows),
                lambda entry: tuple(entry["image"].shape) == tuple(image.shape),
            )["image"]
            for v in range(1, views)
        ]
        image = torch.stack([image, *extra], dim=1)  # (N, views, F)
    if "text" in saved:
        return image, TextCache(saved["text"])
    return image, TextCache(saved["text_hidden"], saved["text_aux"])


def _cut_from_whole_source(
    model: DualEncoder, subset: KeySubset, folder: Path, views: int, share: _Share
) -> tuple[torch.Tensor, TextCache] | None:
    """A key subset's features cut out of its whole source's entries when all of them are cached (a
    curated key list, tried at several settings, then costs no trunk pass); ``None`` when any is missing."""
    whole = subset.source
    paths = [folder / f"{cache_key(model, whole, v)}.pt" for v in range(views)]
    found = all(p.is_file() for p in paths)
    if share.world_size > 1:  # every process takes the same path
        everyone: list[bool | None] = [None] * share.world_size
        dist.all_gather_object(everyone, found)
        found = all(everyone)
    if not found:
        return None
    n, text_only = len(whole), model.text_cache_layer() is None
    saved = load_cached(paths[0], lambda e: all(t.shape[0] == n for t in e.values()) and ("text" in e) == text_only)
    extra = [load_cached(p, lambda e: e["image"].shape[0] == n) for p in paths[1:]]
    if saved is None or any(e is None for e in extra):  # damaged entries were removed: compute the subset
        return None
    rows = torch.from_numpy(subset.indexes)
    image = saved["image"][rows]
    if views > 1:
        image = torch.stack([image, *(e["image"][rows] for e in extra)], dim=1)
    if "text" in saved:
        return image, TextCache(saved["text"][rows])
    return image, TextCache(saved["text_hidden"][rows], saved["text_aux"][rows])


def _mix(seed: int) -> int:
    """Scramble a sample seed (consecutive within a batch) so that its view does not follow its slot."""
    return ((seed * 0x9E3779B97F4A7C15) & ((1 << 64) - 1)) >> 32


class FeaturePairs(Dataset):
    """``(index, seed)`` -> the cached (image features, text trunk output) pair.

    With several cached views per image (``image`` of shape (N, views, F)), a hash of the seed picks one.
    """

    def __init__(self, image: torch.Tensor, text: TextCache) -> None:
        self.image, self.text = image, text

    def __len__(self) -> int:
        return self.image.shape[0]

    def __getitems__(self, items: list[tuple[int, int]]) -> tuple[torch.Tensor, TextCache]:
        index = torch.tensor([i for i, _ in items])
        text = self.text[index]
        if self.image.ndim == 3:  # (N, views, F): the sample's seed picks its view
            views = torch.tensor([_mix(seed) % self.image.shape[1] for _, seed in items])
            return self.image[index, views], text
        return self.image[index], text

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, TextCache]:
        image, text = self.__getitems__([item])
        return image[0], text[0]


def make_feature_loader(
    mixture: Mixture,
    image: torch.Tensor,
    text: TextCache,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    **sampling: Any,
) -> DataLoader:
    """Batches of cached features in exactly the order image batches of ``mixture`` would come in."""
    sampler = ResumableBatchSampler(mixture.layout(), batch_size, seed, start_step, num_steps, **sampling)
    return DataLoader(FeaturePairs(image, text), batch_sampler=sampler, collate_fn=lambda batch: batch)

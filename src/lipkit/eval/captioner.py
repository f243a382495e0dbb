"""Caption image files with a CoCa model: what ``lipkit caption`` runs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lipkit.data.decode import IMAGE_FILE_SUFFIXES, UndecodableImage, flatten, open_image
from lipkit.errors import LipkitError
from lipkit.models.coca import CoCa, decode_captions, special_ids


@dataclass
class CaptionSettings:
    """How :meth:`CoCa.generate` writes captions (see its arguments)."""

    method: str = "beam"
    max_length: int = 30
    min_length: int = 5
    num_beams: int = 6
    top_k: int = 50
    top_p: float = 0.9
    temperature: float = 1.0
    repetition_penalty: float = 1.0
    length_penalty: float = 1.0
    seed: int = 0


@dataclass
class CaptionResult:
    """One image's caption, or why it has none.

    Attributes:
        path: The image file.
        caption: The caption, or ``None`` when the file could not be read as an image.
        error: Why it could not (``None`` on success).
    """

    path: Path
    caption: str | None
    error: str | None = None


@dataclass
class Captioner:
    """A CoCa model with its tokenizer and image transform, captioning batches of image files.

    Attributes:
        model: The model (in eval mode, on its device).
        tokenizer: Its tokenizer (:func:`lipkit.get_tokenizer`), which turns ids back into text.
        transform: Its evaluation image transform.
        settings: Generation settings.
    """

    model: CoCa
    tokenizer: Any
    transform: Any
    settings: CaptionSettings = field(default_factory=CaptionSettings)

    @classmethod
    def from_model(cls, model: Any, settings: CaptionSettings | None = None, **tokenizer_overrides: Any) -> Captioner:
        """Wrap a model built by :func:`lipkit.create_model`.

        Raises:
            LipkitError: The model has no captioning decoder.
        """
        from lipkit.models.factory import get_tokenizer, image_transform

        if not isinstance(model, CoCa):
            raise LipkitError(
                f"{type(model).__name__} has no captioning decoder: captions need a CoCa model (e.g. coca_ViT-B-32)"
            )
        tokenizer = get_tokenizer(model.cfg, **tokenizer_overrides)
        return cls(model.eval(), tokenizer, image_transform(model.cfg), settings or CaptionSettings())

    def caption_images(self, images: torch.Tensor) -> list[str]:
        """Captions of preprocessed images (B, 3, H, W)."""
        s = self.settings
        sot, eos = special_ids(self.tokenizer)
        device = next(self.model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(s.seed)
        ids = self.model.generate(
            images.to(device),
            method=s.method,
            max_length=s.max_length,
            min_length=s.min_length,
            num_beams=s.num_beams,
            top_k=s.top_k,
            top_p=s.top_p,
            temperature=s.temperature,
            repetition_penalty=s.repetition_penalty,
            length_penalty=s.length_penalty,
            sot_id=sot,
            eos_id=eos,
            generator=generator,
        )
        return decode_captions(ids, self.tokenizer, eos)

    def caption_files(self, paths: Iterable[Path], batch_size: int = 16) -> Iterator[CaptionResult]:
        """Caption image files in batches; a file that is not a readable image gives a result with its error."""
        batch: list[tuple[Path, torch.Tensor]] = []
        for path in paths:
            try:
                batch.append((path, self.transform(flatten(open_image(path)))))
            except (UndecodableImage, OSError) as exc:  # an unreadable file is reported, never fatal
                yield CaptionResult(path, None, str(exc))
                continue
            if len(batch) == batch_size:
                yield from self._flush(batch)
                batch = []
        if batch:
            yield from self._flush(batch)

    def _flush(self, batch: list[tuple[Path, torch.Tensor]]) -> Iterator[CaptionResult]:
        captions = self.caption_images(torch.stack([image for _, image in batch]))
        for (path, _), caption in zip(batch, captions, strict=True):
            yield CaptionResult(path, caption)


def image_files(inputs: Iterable[str | Path]) -> list[Path]:
    """Image files named or found (recursively, sorted) in the folders named.

    Raises:
        LipkitError: A path does not exist, or a folder holds no image files.
    """
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_FILE_SUFFIXES)
            if not found:
                raise LipkitError(f"{item} holds no image files ({', '.join(IMAGE_FILE_SUFFIXES)})")
            files += found
        elif item.exists():
            files.append(item)
        else:
            raise LipkitError(f"no such file or folder: {item}")
    return files

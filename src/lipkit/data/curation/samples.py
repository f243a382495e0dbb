"""Reading a pair's raw facts for curation: its image bytes and whether its caption needed the fallback encoding."""

from __future__ import annotations

from pathlib import Path

from lipkit.data.decode import UndecodableImage, decode_text, encode_image
from lipkit.data.pairs import PairSource


def base_source(source: PairSource, index: int) -> tuple[PairSource, int]:
    """The underlying source and index of a pair of a concatenation or a key subset."""
    from lipkit.data.spec import ConcatPairs, KeySubset

    while True:
        if isinstance(source, ConcatPairs):
            source, index = source._locate(index)
        elif isinstance(source, KeySubset):
            source, index = source.source, int(source.indexes[index])
        else:
            return source, index


def image_bytes(source: PairSource, index: int) -> bytes:
    """The encoded bytes of a pair's image: the stored file or shard member, else a PNG of the generated image.

    Raises:
        UndecodableImage: The file or member cannot be read, or the image cannot be generated.
    """
    from lipkit.data.shards import ShardPairs

    source, index = base_source(source, index)
    if isinstance(source, ShardPairs):
        return source._read(index, source.image_loc[index], UndecodableImage)
    pairs = getattr(source, "pairs", None)
    if pairs is not None:
        try:
            return Path(pairs[index].image_path).read_bytes()
        except OSError as exc:
            raise UndecodableImage(f"{pairs[index].image_path}: {exc.strerror or exc}") from None
    return encode_image(source.image(index), "png")


def caption_fallback(source: PairSource, index: int) -> bool:
    """Whether a pair's caption was not UTF-8 (and was read by the fallback encoding)."""
    from lipkit.data.decode import UnreadableCaption
    from lipkit.data.shards import ShardPairs

    source, index = base_source(source, index)
    if isinstance(source, ShardPairs):
        return decode_text(source._read(index, source.text_loc[index], UnreadableCaption))[1]
    pairs = getattr(source, "pairs", None)
    return bool(pairs[index].caption_fallback) if pairs is not None else False

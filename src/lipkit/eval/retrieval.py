"""Image-text retrieval metrics, computed in chunks so the full similarity matrix is never held."""

from __future__ import annotations

import torch

from lipkit.errors import LipkitError


def _ranks(queries: torch.Tensor, keys: torch.Tensor, positives: list[torch.Tensor], chunk: int) -> torch.Tensor:
    """0-based rank of each query's best positive key among all keys (ties count in the query's favour)."""
    ranks = []
    for start in range(0, queries.shape[0], chunk):
        sims = queries[start : start + chunk] @ keys.T  # (chunk, K)
        for row, pos in zip(sims, positives[start : start + chunk]):
            best = row[pos].max()
            ranks.append(int((row > best).sum()))
    return torch.tensor(ranks)


def retrieval_metrics(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    text_to_image: torch.Tensor | None = None,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """Recall@k (in percent) and median rank for image->text and text->image retrieval.

    Args:
        image_features: L2-normalised image embeddings (N, D).
        text_features: L2-normalised caption embeddings (M, D).
        text_to_image: For each caption, the index of its image (M,); ``None`` means caption i belongs
            to image i (M == N). Several captions may share an image, as in COCO.
        ks: The k of Recall@k.
        chunk: Queries per similarity block; memory is O(chunk x max(N, M)).

    Returns:
        ``image_to_text_R@k``, ``text_to_image_R@k`` for each k, and the two median ranks (1-based).
    """
    n, m = image_features.shape[0], text_features.shape[0]
    if n == 0 or m == 0:
        raise LipkitError("retrieval needs at least one image and one caption")
    if text_to_image is None:
        if n != m:
            raise LipkitError(f"{n} images and {m} captions: pass text_to_image to pair them")
        text_to_image = torch.arange(n)
    captions_of = [[] for _ in range(n)]
    for t, i in enumerate(text_to_image.tolist()):
        captions_of[i].append(t)
    if any(not c for c in captions_of):
        raise LipkitError("every image needs at least one caption")
    i2t = _ranks(image_features, text_features, [torch.tensor(c) for c in captions_of], chunk)
    t2i = _ranks(text_features, image_features, [torch.tensor([i]) for i in text_to_image.tolist()], chunk)
    out = {}
    for k in ks:
        out[f"image_to_text_R@{k}"] = 100.0 * float((i2t < k).float().mean())
        out[f"text_to_image_R@{k}"] = 100.0 * float((t2i < k).float().mean())
    out["image_to_text_median_rank"] = float(i2t.float().median()) + 1
    out["text_to_image_median_rank"] = float(t2i.float().median()) + 1
    return out

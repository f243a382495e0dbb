"""Filters: plain predicates over rows, each returning a boolean keep mask.

* Caption length (DataComp's "basic" filter): at least ``min_words`` words and ``min_chars`` characters
  (DataComp keeps captions of more than 2 words and more than 5 characters: 3 and 6 here).
* Image size: the shorter side at least ``min_side`` pixels and the aspect ratio (longer side over
  shorter) at most ``max_aspect`` (DataComp: 200 and 3).
* Image-text score: the cosine similarity of a row's image and caption embeddings, kept at or above a
  threshold (LAION kept 0.28 with ViT-B/32) or kept in the top fraction (DataComp's best simple filter
  kept the top 30%).

A threshold of 0 (or ``None``) turns a check off. Every filter looks at each row alone, except the top
fraction, which ranks the rows it is given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def word_count(caption: str) -> int:
    """Whitespace-separated words of a caption."""
    return len(caption.split())


def caption_mask(captions: Sequence[str], min_words: int = 3, min_chars: int = 6) -> np.ndarray:
    """Captions with at least ``min_words`` words and ``min_chars`` characters (surrounding space ignored)."""
    return np.array([word_count(c) >= min_words and len(c.strip()) >= min_chars for c in captions], bool)


def size_mask(widths: np.ndarray, heights: np.ndarray, min_side: int = 200) -> np.ndarray:
    """Images whose shorter side is at least ``min_side`` pixels."""
    return np.minimum(np.asarray(widths), np.asarray(heights)) >= min_side


def aspect_ratio(widths: np.ndarray, heights: np.ndarray) -> np.ndarray:
    """Longer side over shorter side (1 for a square; infinite for an empty side)."""
    w, h = np.asarray(widths, np.float64), np.asarray(heights, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.minimum(w, h) > 0, np.maximum(w, h) / np.minimum(w, h), np.inf)


def aspect_mask(widths: np.ndarray, heights: np.ndarray, max_aspect: float | None = 3.0) -> np.ndarray:
    """Images whose aspect ratio is at most ``max_aspect`` (``None`` or 0: all)."""
    if not max_aspect:
        return np.ones(len(widths), bool)
    return aspect_ratio(widths, heights) <= max_aspect


def image_text_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of unit image and text embeddings: (N, D), (N, D) -> (N,)."""
    return np.einsum("nd,nd->n", np.asarray(image, np.float64), np.asarray(text, np.float64))


def score_mask(scores: np.ndarray, min_score: float) -> np.ndarray:
    """Rows whose image-text score is at least ``min_score``."""
    return np.asarray(scores) >= min_score


def top_fraction_count(n: int, fraction: float) -> int:
    """How many of ``n`` rows a top fraction keeps: ``ceil(fraction * n)`` (so any row at all keeps one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"the top fraction must be in (0, 1], got {fraction}")
    return min(n, math.ceil(fraction * n - 1e-9))


def top_fraction_mask(keys: Sequence[str], scores: np.ndarray, fraction: float) -> np.ndarray:
    """The ``ceil(fraction * n)`` highest-scoring rows; equal scores are ranked by key (smaller first)."""
    scores = np.asarray(scores, np.float64)
    order = sorted(range(len(keys)), key=lambda i: (-scores[i], keys[i]))
    mask = np.zeros(len(keys), bool)
    mask[order[: top_fraction_count(len(keys), fraction)]] = True
    return mask

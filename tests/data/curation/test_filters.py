from __future__ import annotations

import math

import numpy as np
import pytest

from lipkit.data.corpora import TuxPaintPairs
from lipkit.data.curation.filters import (
    aspect_mask,
    caption_mask,
    image_text_scores,
    score_mask,
    size_mask,
    top_fraction_count,
    top_fraction_mask,
)


@pytest.fixture(scope="module")
def captions() -> list[str]:
    source = TuxPaintPairs("all")
    return [source.caption(i) for i in range(len(source))] + ["", "   ", "a b", "abc de", "  padded  words here  "]


@pytest.mark.parametrize(("min_words", "min_chars"), [(3, 6), (1, 1), (5, 20), (0, 0)])
def test_caption_filter_keeps_what_the_plain_predicate_keeps(captions, min_words, min_chars):
    mask = caption_mask(captions, min_words, min_chars)
    expected = [len(c.split()) >= min_words and len(c.strip()) >= min_chars for c in captions]
    assert mask.tolist() == expected
    assert 0 < sum(expected) <= len(captions)


def test_datacomp_defaults_on_hand_made_captions():
    kept = caption_mask(["a frog", "a green frog", "a b c", "big red fox", "  ox ox ox  "]).tolist()
    assert kept == [False, True, False, True, True]  # 3 words and 6 characters at least


def test_image_size_and_aspect_filters_keep_what_the_plain_predicate_keeps():
    rng = np.random.default_rng(0)
    w, h = rng.integers(1, 800, 500), rng.integers(1, 800, 500)
    w[:3], h[:3] = (200, 600, 199), (600, 200, 600)  # the edges: exactly 200 and exactly 3:1
    assert size_mask(w, h, 200).tolist() == [min(a, b) >= 200 for a, b in zip(w, h)]
    assert aspect_mask(w, h, 3.0).tolist() == [max(a, b) / min(a, b) <= 3.0 for a, b in zip(w, h)]
    assert size_mask(w, h, 200)[:3].tolist() == [True, True, False]
    assert aspect_mask(w, h, 3.0)[:3].tolist() == [True, True, False]
    assert aspect_mask(w, h, 0).all() and size_mask(w, h, 0).all()
    assert aspect_mask(np.array([0, 5]), np.array([5, 5]), 3.0).tolist() == [False, True]


def test_score_threshold_and_scores():
    rng = np.random.default_rng(1)
    image = rng.normal(size=(40, 16))
    text = rng.normal(size=(40, 16))
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    scores = image_text_scores(image, text)
    np.testing.assert_allclose(scores, [float(a @ b) for a, b in zip(image, text)], atol=1e-12)
    assert score_mask(scores, 0.1).tolist() == [s >= 0.1 for s in scores]


TOP_CASES = [(10, 0.3, 3), (10, 0.25, 3), (7, 0.3, 3), (10, 1.0, 10), (10, 0.01, 1), (1, 0.3, 1)]


@pytest.mark.parametrize(("n", "fraction", "expected"), TOP_CASES)
def test_top_fraction_keeps_ceil_of_the_fraction(n, fraction, expected):
    assert top_fraction_count(n, fraction) == expected == math.ceil(round(fraction * n, 9))
    rng = np.random.default_rng(n)
    scores = rng.random(n)
    keys = [f"k{i:02d}" for i in range(n)]
    mask = top_fraction_mask(keys, scores, fraction)
    assert mask.sum() == expected
    assert set(np.flatnonzero(mask)) == set(np.argsort(-scores)[:expected])


def test_top_fraction_breaks_ties_by_key():
    keys = ["d", "b", "a", "c", "e"]
    mask = top_fraction_mask(keys, np.array([0.5, 0.9, 0.5, 0.5, 0.1]), 0.6)  # 3 of 5: b, then a and c of the 0.5s
    assert [k for k, m in zip(keys, mask) if m] == ["b", "a", "c"]
    with pytest.raises(ValueError, match="top fraction"):
        top_fraction_count(5, 0)

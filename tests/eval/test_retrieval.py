from __future__ import annotations

import pytest
import torch

from lipkit.errors import LipkitError
from lipkit.eval.retrieval import retrieval_metrics


def test_perfect_and_known_rankings():
    eye = torch.eye(4)
    m = retrieval_metrics(eye, eye, ks=(1,))
    assert m["image_to_text_R@1"] == m["text_to_image_R@1"] == 100.0
    assert m["image_to_text_median_rank"] == 1.0
    # Captions in reverse order: caption i matches image 3 - i best.
    texts = eye.flip(0)
    m = retrieval_metrics(eye, texts, ks=(1, 4))
    assert m["image_to_text_R@1"] == 0.0 and m["image_to_text_R@4"] == 100.0


def test_hand_made_similarity_with_partial_hits():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # sims[i, t]: image 1 prefers text 2 (1.0) over its own text 1 (0.8); image 2 prefers text 1 (1.0) over 2.
    m = retrieval_metrics(images, texts, ks=(1, 2))
    assert m["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert m["image_to_text_R@2"] == pytest.approx(100.0)
    assert m["text_to_image_R@1"] == pytest.approx(100 / 3)


def test_several_captions_per_image_and_chunking():
    torch.manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(50, 16), dim=-1)
    owner = torch.arange(50).repeat_interleave(2)
    texts = torch.nn.functional.normalize(images[owner] + 0.3 * torch.randn(100, 16), dim=-1)
    full = retrieval_metrics(images, texts, owner, chunk=1000)
    assert full == retrieval_metrics(images, texts, owner, chunk=7)
    assert full["image_to_text_R@10"] >= full["image_to_text_R@1"] > 50.0


def test_image_to_text_counts_the_best_of_an_images_captions():
    images = torch.eye(3)
    texts = torch.eye(3)[[1, 0, 1, 2]]  # caption 0 (of image 0) looks like image 1; caption 1 is right
    owner = torch.tensor([0, 0, 1, 2])
    m = retrieval_metrics(images, texts, owner, ks=(1,))
    assert m["image_to_text_R@1"] == 100.0
    assert m["text_to_image_R@1"] == 75.0


def test_bad_inputs():
    with pytest.raises(LipkitError, match="pass text_to_image"):
        retrieval_metrics(torch.eye(3), torch.eye(4)[:, :3])
    with pytest.raises(LipkitError, match="at least one"):
        retrieval_metrics(torch.zeros(0, 3), torch.zeros(0, 3))
    with pytest.raises(LipkitError, match="every image"):
        retrieval_metrics(torch.eye(3), torch.eye(3)[:2], torch.tensor([0, 0]))

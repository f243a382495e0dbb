"""Classification metrics on hand-made score matrices with known answers."""

from __future__ import annotations

import pytest
import torch

from lipkit.errors import LipkitError
from lipkit.eval.metrics import ClassificationCounts, classification_metrics, count_predictions, metrics_from_counts

SCORES = torch.tensor(
    [
        [0.9, 0.1, 0.0],  # true 0, predicted 0
        [0.2, 0.7, 0.1],  # true 0, predicted 1; 0 is second
        [0.1, 0.8, 0.1],  # true 1, predicted 1
        [0.0, 0.3, 0.7],  # true 1, predicted 2; 1 is second
        [0.1, 0.2, 0.7],  # true 2, predicted 2
        [0.5, 0.1, 0.4],  # true 2, predicted 0; 2 is second
        [0.0, 0.1, 0.9],  # true 2, predicted 2
    ]
)
LABELS = torch.tensor([0, 0, 1, 1, 2, 2, 2])


def test_classification_metrics_known_answers():
    m = classification_metrics(SCORES, LABELS, 3, ks=(1, 2, 5))
    assert m["top1"] == pytest.approx(100 * 4 / 7)
    assert m["top2"] == pytest.approx(100.0) and m["top3"] == 100.0  # top-5 is capped at 3 classes
    assert "top5" not in m
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert m["per_class_recall"] == pytest.approx([50.0, 50.0, 200 / 3])
    assert m["mean_per_class_recall"] == pytest.approx((50 + 50 + 200 / 3) / 3)
    assert m["n"] == 7


def test_counts_of_shares_add_up_to_the_whole_set():
    counts = count_predictions(SCORES, LABELS, 3, ks=(2, 1))
    assert counts.ks == (1, 2) and counts.topk_hits.tolist() == [4, 7]
    assert counts.confusion.tolist() == [[1, 1, 0], [0, 1, 1], [1, 0, 2]]
    total = ClassificationCounts.zeros(3, ks=(1, 2))
    for share in ([0, 2, 4, 6], [1, 3, 5], []):  # as ranks see them, one of them empty
        part = count_predictions(SCORES[share], LABELS[share], 3, ks=(1, 2))
        total = ClassificationCounts(total.confusion + part.confusion, total.topk_hits + part.topk_hits, total.ks)
    assert metrics_from_counts(total) == classification_metrics(SCORES, LABELS, 3, ks=(1, 2))


def test_classes_without_samples_are_left_out_of_the_mean():
    scores = torch.eye(4)[[0, 0, 1]]  # predictions 0, 0, 1
    m = classification_metrics(scores, torch.tensor([0, 0, 2]), 4, ks=(1,))
    assert m["per_class_recall"] == [100.0, None, 0.0, None]
    assert m["mean_per_class_recall"] == 50.0 and m["top1"] == pytest.approx(200 / 3)
    assert m["confusion_matrix"][2] == [0, 1, 0, 0]


def test_classification_metrics_bad_inputs():
    with pytest.raises(LipkitError, match="do not fit"):
        classification_metrics(torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), 3)
    with pytest.raises(LipkitError, match="labels range"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 2]), 2)
    with pytest.raises(LipkitError, match="no samples"):
        classification_metrics(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 2)
    with pytest.raises(LipkitError, match="k >= 1"):
        classification_metrics(torch.zeros(2, 2), torch.tensor([0, 1]), 2, ks=(0,))

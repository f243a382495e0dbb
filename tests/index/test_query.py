"""Query combinations and near-duplicate collapsing, on hand-made vectors."""

from __future__ import annotations

import numpy as np
import pytest

from lipkit.index.errors import QueryError
from lipkit.index.query import collapse_near_duplicates, combine


def test_combine_is_the_normalised_weighted_sum_of_unit_vectors():
    car, toy = np.array([3.0, 0.0, 0.0]), np.array([0.0, 2.0, 0.0])  # normalised first: e1 and e2
    np.testing.assert_allclose(combine([car, toy], [1.0, -1.0]), np.array([1, -1, 0]) / np.sqrt(2), atol=1e-7)
    np.testing.assert_allclose(combine([car, toy], [3.0, 1.0]), np.array([3, 1, 0]) / np.sqrt(10), atol=1e-7)
    np.testing.assert_allclose(combine([car.reshape(1, 3)], [0.5]), [1.0, 0.0, 0.0])
    assert combine([car, toy], [1.0, 1.0]).dtype == np.float32


@pytest.mark.parametrize(
    ("vectors", "weights", "message"),
    [
        ([np.array([1.0, 0.0]), np.array([2.0, 0.0])], [1.0, -1.0], "cancel out"),
        ([np.array([1.0, 0.0])], [1.0, 2.0], "one weight per vector"),
        ([], [], "one weight per vector"),
        ([np.array([1.0, 0.0]), np.array([1.0, 0.0, 0.0])], [1.0, 1.0], "differ in size"),
        ([np.zeros(3)], [1.0], "zero or not finite"),
    ],
)
def test_combine_refuses_what_has_no_direction(vectors, weights, message):
    with pytest.raises(QueryError, match=message):
        combine(vectors, weights)


def test_collapse_keeps_the_best_of_each_connected_group():
    angle = np.deg2rad([0.0, 10.0, 20.0, 90.0, 95.0, 180.0])
    vectors = np.stack([np.cos(angle), np.sin(angle)], axis=1)  # cos(10 deg) = 0.985, cos(20 deg) = 0.94
    hits = ["a", "b", "c", "d", "e", "f"]  # best first
    # a~b and b~c at 0.985 (a and c only 0.94 apart) form one chain; d~e; f alone
    assert collapse_near_duplicates(hits, vectors, 0.98) == ["a", "d", "f"]
    assert collapse_near_duplicates(hits, vectors, 0.999) == hits
    assert collapse_near_duplicates(["b", "a"], vectors[[1, 0]], 0.98) == ["b"]  # the first (best) is kept
    assert collapse_near_duplicates([], np.zeros((0, 2)), 0.9) == []

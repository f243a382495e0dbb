"""MetaCLIP balancing: exact probabilities, counts that merge, and hash coins independent of order and batching."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lipkit.data.curation import CurationError
from lipkit.data.curation.balance import coin, count_matches, entry_probability, keep_mask, merge_counts


def test_entry_probability_by_hand():
    counts = np.array([0, 5, 20, 100, 40_000])
    np.testing.assert_array_equal(entry_probability(counts, 20), [1.0, 1.0, 1.0, 0.2, 0.0005])
    np.testing.assert_array_equal(entry_probability(counts, 7.5), [1.0, 1.0, 0.375, 0.075, 7.5 / 40_000])
    with pytest.raises(CurationError, match="must be positive"):
        entry_probability(counts, 0)


def test_counts_by_hand_and_merged_over_shards():
    np.testing.assert_array_equal(count_matches([[0, 2], [2], [], [1, 2]], 4), [1, 1, 3, 0])
    rng = np.random.default_rng(0)
    matches = [sorted(set(rng.integers(0, 50, rng.integers(0, 4)).tolist())) for _ in range(1000)]
    total = count_matches(matches, 50)
    for cuts in ([500], [1, 2, 999], [100, 350, 351, 700]):
        shards = np.split(np.arange(1000), cuts)
        merged = merge_counts(count_matches([matches[i] for i in shard], 50) for shard in shards)
        np.testing.assert_array_equal(merged, total)
    assert total.sum() == sum(map(len, matches))
    with pytest.raises(CurationError, match=r"entry ids must lie in \[0, 3\)"):
        count_matches([[0, 3]], 3)


def corpus(n: int, seed: int = 0) -> tuple[list[str], list[list[int]], np.ndarray]:
    """``n`` keys matching up to four of 40 entries, with a skewed count so some entries are sampled."""
    rng = np.random.default_rng(seed)
    keys = [f"shard{i % 7}/{i:06d}" for i in range(n)]
    matches = [sorted(set((rng.zipf(1.5, rng.integers(0, 5)) % 40).tolist())) for _ in range(n)]
    return keys, matches, entry_probability(count_matches(matches, 40), t=n / 50)


def test_kept_keys_do_not_depend_on_order_or_batches():
    keys, matches, probs = corpus(6000)
    assert (probs < 1).sum() >= 3 and (probs == 1).sum() >= 3  # some entries are sampled, some kept whole
    kept = {k for k, keep in zip(keys, keep_mask(keys, matches, probs, seed=3)) if keep}
    assert 0 < len(kept) < len(keys)
    order = np.random.default_rng(1).permutation(len(keys))
    for batch in (1, 7, 1000, 6000):
        found = set()
        for start in range(0, len(keys), batch):
            chunk = order[start : start + batch]
            mask = keep_mask([keys[i] for i in chunk], [matches[i] for i in chunk], probs, seed=3)
            found |= {keys[i] for i, keep in zip(chunk, mask) if keep}
        assert found == kept


def within(rate: float, p: float, n: int) -> bool:
    """``rate`` within 4.5 binomial standard deviations, sqrt(p (1 - p) / n), of ``p``.

    The coins are hashes of fixed keys, so the test never flakes; 4.5 sigma is the bound a truly uniform,
    independent source would miss about once in 150,000 key sets.
    """
    return abs(rate - p) <= 4.5 * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("ids", [[0], [1], [0, 1], [0, 1, 2], [1, 2, 3]])
def test_keep_rate_is_one_minus_the_product(ids):
    n = 40_000
    probs = np.array([0.1, 0.25, 0.05, 0.6])
    keys = [f"sample-{i}" for i in range(n)]
    rate = keep_mask(keys, [ids] * n, probs, seed=11).mean()
    expected = 1 - np.prod(1 - probs[ids])  # e.g. [0, 1, 2]: 1 - 0.9 * 0.75 * 0.95 = 0.35875
    assert within(rate, expected, n)  # 4.5 sigma at n = 40,000 and p = 0.36: +-0.011


def test_seeds():
    n = 40_000
    keys = [f"k{i}" for i in range(n)]
    matches, probs = [[0, 1]] * n, np.array([0.3, 0.2])  # keep probability 1 - 0.7 * 0.8 = 0.44
    first = keep_mask(keys, matches, probs, seed=5)
    np.testing.assert_array_equal(first, keep_mask(keys, matches, probs, seed=5))
    other = keep_mask(keys, matches, probs, seed=6)
    # independent seeds disagree on a key with probability 2 p (1 - p)
    assert within((first != other).mean(), 2 * 0.44 * 0.56, n)
    assert within(other.mean(), 0.44, n)
    assert coin("k1", 0, 5) == coin("k1", 0, 5) != coin("k1", 0, 6)
    assert len({coin("k1", 0, 5), coin("k2", 0, 5), coin("k1", 1, 5)}) == 3


def test_unmatched_pairs_and_sure_entries():
    probs = np.array([1.0, 1e-9])
    keys, matches = ["a", "b", "c", "d"], [[], [0], [0, 1], [1]]
    np.testing.assert_array_equal(keep_mask(keys, matches, probs, seed=0), [False, True, True, False])
    np.testing.assert_array_equal(keep_mask(keys, matches, probs, 0, keep_unmatched=True), [True, True, True, False])
    with pytest.raises(CurationError, match="4 keys but 3 match lists"):
        keep_mask(keys, matches[:3], probs, seed=0)

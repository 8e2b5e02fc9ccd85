"""recall@K, ndcg@K and hit@K on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.evaluation.metrics import hit_at_k, ndcg_at_k, recall_at_k
from engine.evaluation.protocols import score_rankings


def test_recall_divides_by_min_of_k_and_targets() -> None:
    ranked = np.array([5, 1, 7, 3])
    assert recall_at_k(ranked, {1, 3}, k=4) == 1.0
    assert recall_at_k(ranked, {1, 3}, k=2) == 0.5          # 1 hit / min(2, 2)
    assert recall_at_k(ranked, {1, 3, 9}, k=2) == 0.5       # 1 hit / min(2, 3)
    assert recall_at_k(ranked, {1, 3, 9}, k=4) == 2 / 3     # 2 hits / min(4, 3)
    assert recall_at_k(ranked, {8}, k=4) == 0.0


def test_ndcg_binary_gains_with_ideal_cut_at_min_k_targets() -> None:
    ranked = np.array([5, 1, 7, 3])
    # hits at ranks 2 and 4: 1/log2(3) + 1/log2(5); ideal: two hits at ranks 1, 2: 1 + 1/log2(3)
    expected = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(ranked, {1, 3}, k=4) == pytest.approx(expected)
    # k=2: one hit at rank 2 over the ideal of min(2, 3) = 2 hits
    assert ndcg_at_k(ranked, {1, 3, 9}, k=2) == pytest.approx((1 / math.log2(3)) / (1 + 1 / math.log2(3)))
    assert ndcg_at_k(np.array([1, 3]), {1, 3}, k=2) == pytest.approx(1.0)
    assert ndcg_at_k(ranked, {8}, k=4) == 0.0


def test_short_rankings_count_missing_positions_as_misses() -> None:
    assert recall_at_k(np.array([2]), {2, 4}, k=3) == 0.5
    assert ndcg_at_k(np.array([2]), {2, 4}, k=3) == pytest.approx(1 / (1 + 1 / math.log2(3)))


def test_hit_at_k() -> None:
    assert hit_at_k(np.array([4, 2, 9]), 9, k=3)
    assert not hit_at_k(np.array([4, 2, 9]), 9, k=2)
    assert not hit_at_k(np.array([], dtype=np.int64), 9, k=2)


def test_bad_arguments_name_the_rule() -> None:
    with pytest.raises(ValueError, match="k must be a positive integer"):
        recall_at_k(np.array([1]), {1}, k=0)
    with pytest.raises(ValueError, match="at least one target"):
        ndcg_at_k(np.array([1]), set(), k=5)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        hit_at_k(np.array([1]), 1, k=-1)


def test_scores_are_averaged_over_users() -> None:
    ranked = [np.array([1, 2]), np.array([3, 4])]
    targets = [np.array([1]), np.array([9])]
    assert score_rankings(ranked, targets, k=2) == {"recall@2": 0.5, "ndcg@2": 0.5}

"""Top-K accuracy metrics with binary gains. A ranking is a 1-D array of item rows, best first."""

from __future__ import annotations

from collections.abc import Collection

import numpy as np


def _check_k(k: int) -> None:
    if k < 1:
        raise ValueError(f"k must be a positive integer; got {k}")


def _hits(ranked: np.ndarray, targets: Collection[int], k: int) -> np.ndarray:
    """Boolean mask over the first k ranked rows: True where the row is a target."""
    _check_k(k)
    if len(targets) == 0:
        raise ValueError("a metric needs at least one target item; got none")
    return np.isin(np.asarray(ranked)[:k], np.fromiter(targets, dtype=np.int64))


def recall_at_k(ranked: np.ndarray, targets: Collection[int], k: int) -> float:
    """Hits in the top k / min(k, number of targets)."""
    return float(_hits(ranked, targets, k).sum()) / min(k, len(targets))


def ndcg_at_k(ranked: np.ndarray, targets: Collection[int], k: int) -> float:
    """DCG of the top k with gain 1 per hit and discount 1/log2(rank + 1), over the ideal DCG for
    min(k, number of targets) hits."""
    hits = _hits(ranked, targets, k)
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    ideal = discounts[: min(k, len(targets))].sum()
    return float(discounts[: hits.size][hits].sum() / ideal)


def hit_at_k(ranked: np.ndarray, target: int, k: int) -> bool:
    """True when `target` is among the first k ranked rows."""
    _check_k(k)
    return bool(np.any(np.asarray(ranked)[:k] == target))

"""The adjust stage's diversity: maximal marginal relevance over a request's scored candidates."""

from __future__ import annotations

import numpy as np


def mmr(scores: np.ndarray, vectors: np.ndarray, k: int, diversity: float) -> np.ndarray:
    """The positions of k picks, in pick order, by maximal marginal relevance.

    Each next pick maximises `(1 - diversity) * rel - diversity * max cosine to the picks so far`,
    where `rel` is the scores scaled to [0, 1] over the candidates; ties go to the higher score,
    then to the earlier position. 0 keeps the score order.

    Args:
        scores: shape (n,), the candidates' final scores.
        vectors: shape (n, d), float32, unit rows: the candidates' item vectors.
    """
    order = np.argsort(-scores, kind="stable")
    s, v = scores[order], vectors[order]
    spread = float(s[0] - s[-1]) if len(s) else 0.0
    rel = (s - s[-1]) / spread if spread > 0 else np.zeros(len(s))
    nearest = np.zeros(len(s))  # the largest cosine to a pick so far (0 before the first)
    free = np.ones(len(s), bool)
    picks = []
    for _ in range(min(k, len(s))):
        gain = np.where(free, (1.0 - diversity) * rel - diversity * nearest, -np.inf)
        j = int(np.argmax(gain))
        picks.append(j)
        free[j] = False
        sim = v @ v[j]
        nearest = sim if len(picks) == 1 else np.maximum(nearest, sim)
    return order[np.array(picks, np.int64)]


__all__ = ["mmr"]

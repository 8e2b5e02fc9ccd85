"""The two reference points: uniform random and training popularity."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Query, ScoringMethod, TrainSet


class RandomMethod(ScoringMethod):
    """Uniformly random scores from a seeded generator (a fresh draw per query)."""

    name = "random"

    def _fit(self, train: TrainSet) -> None:
        self._n_items = train.n_items
        self._rng = np.random.default_rng(self.seed)

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        return self._rng.random((len(queries), self._n_items))


class PopularityMethod(ScoringMethod):
    """Items by their number of training positives, the same list for everyone."""

    name = "popularity"

    def _fit(self, train: TrainSet) -> None:
        self._counts = train.popularity().astype(np.float64)

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        return np.broadcast_to(self._counts, (len(queries), self._counts.shape[0]))

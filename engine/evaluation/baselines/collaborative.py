"""Pure collaborative filtering from the `implicit` library: item-item cosine KNN and ALS with fold-in."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from .base import Query, ScoringMethod, TrainSet, history_matrix


class ItemKNNMethod(ScoringMethod):
    """Item-item cosine on the training interactions (implicit's CosineRecommender, K neighbours
    per item); a user's score for an item is the summed similarity to the items in their history."""

    name = "itemknn"

    def __init__(self, seed: int = 0, neighbours: int = 1000, num_threads: int = 2) -> None:
        super().__init__(seed)
        self.neighbours = neighbours
        self.num_threads = num_threads

    def _fit(self, train: TrainSet) -> None:
        from implicit.nearest_neighbours import CosineRecommender

        from implicit.utils import ParameterWarning

        model = CosineRecommender(K=self.neighbours, num_threads=self.num_threads)
        with warnings.catch_warnings():
            # implicit transposes our CSR input itself and then warns that it got COO
            warnings.simplefilter("ignore", ParameterWarning)
            model.fit(train.matrix(), show_progress=False)
        self._similarity = model.similarity.tocsr()
        self._n_items = train.n_items

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        return (history_matrix(queries, self._n_items) @ self._similarity).toarray()


class ALSMethod(ScoringMethod):
    """Implicit-feedback ALS (implicit's AlternatingLeastSquares, confidence 1 + alpha); every query
    user is folded in from their history with `recalculate_user`, known or not."""

    name = "als"

    def __init__(self, seed: int = 0, factors: int = 32, regularization: float = 1.0,
                 alpha: float = 5.0, iterations: int = 15, num_threads: int = 2) -> None:
        super().__init__(seed)
        self.params = dict(factors=factors, regularization=regularization, alpha=alpha,
                           iterations=iterations, num_threads=num_threads)

    def _fit(self, train: TrainSet) -> None:
        from implicit.cpu.als import AlternatingLeastSquares

        with threadpool_limits(1, "blas"):  # implicit's own advice: BLAS threads fight its threads
            self._model = AlternatingLeastSquares(random_state=self.seed, **self.params)
            self._model.fit(train.matrix(), show_progress=False)
        self._n_items = train.n_items

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        rows = history_matrix(queries, self._n_items)
        with threadpool_limits(1, "blas"):
            users = self._model.recalculate_user(np.arange(len(queries)), rows)
        return np.asarray(users) @ self._model.item_factors.T

"""Co-occurrence plus popularity: items liked by the same users as the history, damped by logs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .base import Query, ScoringMethod, TrainSet, history_matrix


class CooccurrenceMethod(ScoringMethod):
    """score(j) = log(1 + sum over history items i of C[i, j]) + log(1 + pop(j)).

    C = X^T X with a zero diagonal counts the training users who liked both i and j; pop(j) is j's
    number of training positives. A user with no history gets popularity.
    """

    name = "cooc"

    def _fit(self, train: TrainSet) -> None:
        x = train.matrix()
        cooc = (x.T @ x).tocsr()  # integer counts, exact in float32 below 2**24
        cooc.setdiag(0.0)
        cooc.eliminate_zeros()
        self._cooc = cooc
        self._log_pop = np.log1p(train.popularity().astype(np.float64))
        self._n_items = train.n_items

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        together = (history_matrix(queries, self._n_items) @ self._cooc).toarray()
        return np.log1p(together.astype(np.float64)) + self._log_pop

"""LightFM hybrid (the `lightfm-next` package, WARP loss): item features are the item's id plus the
words of its title, categories and text, so a cold item is placed by its words."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy.sparse import csr_matrix, hstack, identity
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.preprocessing import normalize

from .base import Query, ScoringMethod, TrainSet, history_matrix
from .content import item_document

UserFeatures = Literal["ids", "history"]


def split_history(interactions: csr_matrix, rng: np.random.Generator) -> tuple[csr_matrix, csr_matrix]:
    """Each user's positives split at random into (features, targets), disjoint, their sum the input.

    A user with n positives gets n // 2 of them, drawn uniformly, as features and the other
    n - n // 2 as targets (one positive: no features).

    Args:
        interactions: binary, shape (n_users, n_items).

    Returns:
        Two binary matrices of the input's shape and dtype.
    """
    m = csr_matrix(interactions, copy=True)
    m.sum_duplicates()
    counts = np.diff(m.indptr)
    rows = np.repeat(np.arange(m.shape[0]), counts)
    order = np.lexsort((rng.random(m.nnz), rows))  # within each row, a random order of its entries
    rank = np.empty(m.nnz, dtype=np.int64)
    rank[order] = np.arange(m.nnz) - m.indptr[rows[order]]
    in_features = rank < counts[rows] // 2
    return _keep(m, in_features), _keep(m, ~in_features)


def _keep(m: csr_matrix, mask: np.ndarray) -> csr_matrix:
    """The entries of m where mask holds, in a matrix of its own (indices copied, not shared)."""
    data = np.where(mask, m.data, 0).astype(m.dtype)
    out = csr_matrix((data, m.indices.copy(), m.indptr.copy()), shape=m.shape)
    out.eliminate_zeros()
    return out


class LightFMMethod(ScoringMethod):
    """LightFM with WARP loss and item features = ids + words.

    `user_features="ids"` (the classic hybrid) fits when the query users are in training (item-cold);
    `"history"` represents every user by the L1-normalised bag of items they liked, LightFM's recipe
    for users it never trained on (user-cold): a new user is their revealed items. A training user's
    bag is a seeded random half of their positives and they are trained on the other half only
    (`split_history`), so no user's features hold an item they are trained to predict.

    Only items with a positive among the interactions trained on get an id feature (any other
    item's id embedding would be untrained noise); `id_weight` sets the id's weight against the
    words before rows are L1-normalised.
    Training is single-threaded because LightFM's multi-threaded SGD is not reproducible.
    """

    name = "lightfm"

    def __init__(self, seed: int = 0, user_features: UserFeatures = "ids", no_components: int = 64,
                 epochs: int = 30, learning_rate: float = 0.05, item_alpha: float = 1e-6,
                 min_df: int = 2, id_weight: float = 3.0, num_threads: int = 1) -> None:
        super().__init__(seed)
        if user_features not in ("ids", "history"):
            raise ValueError(f"user_features must be 'ids' or 'history'; got {user_features!r}")
        self.user_features = user_features
        self.no_components, self.epochs, self.learning_rate = no_components, epochs, learning_rate
        self.item_alpha, self.min_df, self.id_weight = item_alpha, min_df, id_weight
        self.num_threads = num_threads

    def _fit(self, train: TrainSet) -> None:
        from lightfm import LightFM

        interactions, users = train.matrix(), None
        if self.user_features == "history":
            bags, interactions = split_history(interactions, np.random.default_rng(self.seed))
            users = normalize(bags, norm="l1")
        features = self._item_features(train, interactions.getnnz(axis=0) > 0)
        self._model = LightFM(no_components=self.no_components, loss="warp",
                              learning_rate=self.learning_rate, item_alpha=self.item_alpha,
                              random_state=self.seed)
        self._model.fit(interactions.tocoo(), user_features=users, item_features=features,
                        epochs=self.epochs, num_threads=self.num_threads)
        self._item_bias, self._item_emb = self._model.get_item_representations(features)
        self._n_items = train.n_items

    def _item_features(self, train: TrainSet, warm: np.ndarray) -> csr_matrix:
        """Rows: items; columns: one id per warm item (a positive among the interactions trained on),
        then words. Each row sums to 1."""
        words = CountVectorizer(min_df=self.min_df, binary=True, stop_words="english",
                                dtype=np.float32).fit_transform([item_document(it) for it in train.items])
        weight = warm.astype(np.float32) * self.id_weight
        ids = identity(train.n_items, dtype=np.float32, format="csr").multiply(weight[:, None])
        return normalize(csr_matrix(hstack([ids, words])), norm="l1")

    def _user_vectors(self, queries: Sequence[Query]) -> np.ndarray:
        if self.user_features == "history":
            bags = normalize(history_matrix(queries, self._n_items), norm="l1")
            return np.asarray(bags @ self._model.user_embeddings)
        unknown = [q.name or str(i) for i, q in enumerate(queries) if q.user < 0]
        if unknown:
            raise ValueError(f"lightfm with user_features='ids' ranks only users seen in training; "
                             f"unknown: {unknown[:3]}")
        return self._model.user_embeddings[[q.user for q in queries]]

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        return self._user_vectors(queries) @ self._item_emb.T + self._item_bias

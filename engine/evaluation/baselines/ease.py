"""EASE (Steck 2019): a closed-form item-item linear model whose ridge strength is chosen on
held-out training users."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.linalg import lapack
from scipy.sparse import csr_matrix

from ..metrics import recall_at_k
from .base import Query, ScoringMethod, TrainSet, history_matrix, top_k

#: Ridge strengths tried on validation; counts in the Gram matrix of the two datasets run to ~300.
LAMBDAS: tuple[float, ...] = (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)
HOLDOUT = 0.1


def ease_weights(gram: np.ndarray, lam: float) -> np.ndarray:
    """B = -P / diag(P) column-wise with P = (G + lam I)^-1, and diag(B) = 0.

    Args:
        gram: G = X^T X, shape (m, m), symmetric.
        lam: the ridge strength, > 0.

    Returns:
        B, shape (m, m), float32: a user's scores are their binary history row times B.
    """
    p = _ridge_inverse(gram, lam)
    b = p / -np.diag(p)  # broadcasting divides column j by -P[j, j]
    np.fill_diagonal(b, 0.0)
    return b


def _ridge_inverse(gram: np.ndarray, lam: float) -> np.ndarray:
    """(G + lam I)^-1 by Cholesky (LAPACK potrf + potri) in float32, redone from G in float64 when
    float32 rounding makes the factorisation fail; float32 out."""
    for dtype in (np.float32, np.float64):
        a = np.array(gram, dtype=dtype)
        a[np.diag_indices_from(a)] += lam
        potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (a,))
        # a is symmetric, so its transpose is the Fortran-ordered array LAPACK wants, without a copy
        factor, info = potrf(a.T, lower=True, overwrite_a=True, clean=True)
        if info == 0:
            lower, info = potri(factor, lower=True, overwrite_c=True)
            if info == 0:
                return (np.tril(lower) + np.tril(lower, -1).T).astype(np.float32, copy=False)
    raise ValueError(f"EASE needs G + lam I positive definite; its Cholesky factorisation failed "
                     f"even in float64 (lam={lam})")


def _gram(x: csr_matrix) -> np.ndarray:
    """X^T X as a dense float32 array; the counts are integers, exact in float32 below 2**24."""
    return np.asarray((x.T @ x).toarray(), dtype=np.float32)


class EASEMethod(ScoringMethod):
    """EASE on the binary training matrix; score = history row times B.

    Only items with a training positive are in the model (the others score 0). With several
    `lambdas`, `fit` holds out a seeded `holdout` share of the training users with >= 2 positives,
    fits on the rest, reveals the first half (time order) of each held-out user's positives, scores
    recall@k on the other half, keeps the best lam (ties to the larger) and refits on all users.
    The choice is `self.lam`, the validation recall per lam `self.validation`. With no user to hold
    out, lam is the middle of the grid.

    Example:
        >>> method = EASEMethod(seed=0)                                    # doctest: +SKIP
        >>> method.fit(train); method.lam
        300.0
    """

    name = "ease"

    def __init__(self, seed: int = 0, lambdas: Sequence[float] = LAMBDAS, holdout: float = HOLDOUT,
                 k: int = 20) -> None:
        super().__init__(seed)
        if not lambdas or any(not np.isfinite(lam) or lam <= 0 for lam in lambdas):
            raise ValueError(f"lambdas must be a non-empty sequence of finite numbers > 0; got {lambdas!r}")
        if not 0.0 < holdout < 1.0:
            raise ValueError(f"holdout must be a share strictly between 0 and 1; got {holdout}")
        if k < 1:
            raise ValueError(f"k must be a positive integer; got {k}")
        self.lambdas = tuple(float(lam) for lam in lambdas)
        self.holdout, self.k = holdout, k
        self.lam: float | None = None
        self.validation: dict[float, float] = {}

    def _fit(self, train: TrainSet) -> None:
        self._items = np.flatnonzero(train.popularity() > 0)
        self._n_items = train.n_items
        x = train.matrix()[:, self._items]
        self.validation = self._validate(train, x) if len(self.lambdas) > 1 else {}
        if self.validation:
            best = max(self.validation.values())
            self.lam = max(lam for lam, r in self.validation.items() if r >= best - 1e-12)
        else:
            self.lam = sorted(self.lambdas)[(len(self.lambdas) - 1) // 2]
        self._weights = ease_weights(_gram(x), self.lam)

    def _validate(self, train: TrainSet, x: csr_matrix) -> dict[float, float]:
        """recall@k per lam on held-out training users; {} when there is no user to hold out."""
        eligible = np.flatnonzero(np.diff(x.indptr) >= 2)
        size = int(np.floor(self.holdout * len(eligible) + 0.5))
        if size == 0:
            return {}
        held = np.sort(np.random.default_rng(self.seed).choice(eligible, size=size, replace=False))
        revealed, targets = self._reveal_halves(train, held)
        gram = _gram(x[np.setdiff1d(np.arange(x.shape[0]), held)])
        h = history_matrix([Query(-1, r) for r in revealed], len(self._items))
        tiebreak = self._tiebreak[self._items]
        out = {}
        for lam in self.lambdas:
            scores = h @ ease_weights(gram, lam)
            ranked = [top_k(row, self.k, tiebreak, exclude=r) for row, r in zip(scores, revealed)]
            out[lam] = float(np.mean([recall_at_k(rk, t, self.k) for rk, t in zip(ranked, targets)]))
        return out

    def _reveal_halves(self, train: TrainSet, users: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per user, (first half, second half) of their distinct positives in time order, as model columns."""
        column = np.full(train.n_items, -1, dtype=np.int64)
        column[self._items] = np.arange(len(self._items))
        ev = train.events
        revealed, targets = [], []
        for u in users:
            items = column[ev.item[ev.user == u]]  # events are in time order
            items = items[np.sort(np.unique(items, return_index=True)[1])]
            revealed.append(items[: len(items) // 2])
            targets.append(items[len(items) // 2:])
        return revealed, targets

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        h = history_matrix(queries, self._n_items)[:, self._items]
        out = np.zeros((len(queries), self._n_items), dtype=np.float32)
        out[:, self._items] = h @ self._weights
        return out

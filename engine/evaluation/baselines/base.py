"""What every evaluated method shares: the training set, the query, and top-K ranking by score."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy.sparse import csr_matrix

from engine.types import Item

from ..datasets import EventTable

SCORE_CHUNK = 256


@dataclass(frozen=True)
class TrainSet:
    """The positives a method may learn from (one per user-item pair), and the whole catalog."""

    events: EventTable
    items: tuple[Item, ...]
    n_users: int
    user_ids: np.ndarray
    #: Next-item only: one positive per evaluated user, the one after their training positives. It
    #: is not training data; a method may early-stop on it (SASRec does).
    holdout: EventTable | None = None
    #: Sign-up profiles of the users with training events (external id -> text), as an
    #: application holds them before it trains; never a test user's.
    profiles: dict[str, str] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def matrix(self) -> csr_matrix:
        """Binary user-item matrix, shape (n_users, n_items), float32."""
        data = np.ones(len(self.events), dtype=np.float32)
        m = csr_matrix((data, (self.events.user, self.events.item)), shape=(self.n_users, self.n_items))
        m.sum_duplicates()
        m.data[:] = 1.0
        return m

    def popularity(self) -> np.ndarray:
        """Number of training positives per item, shape (n_items,), int64."""
        return np.bincount(self.events.item, minlength=self.n_items)


@dataclass(frozen=True)
class Query:
    """One user to recommend for.

    `user` is their training row, or -1 when training never saw them; `history` the item rows of
    the positives the method may use (time order) and `times` their timestamps; `profile` optional
    sign-up text; `name` the external user id an engine knows them by; `older` item rows the user
    had before `history` (a capped history): masked like the history, never used as input.
    """

    user: int
    history: np.ndarray
    profile: str | None = None
    name: str = ""
    times: np.ndarray | None = None
    older: np.ndarray | None = None

    def masked(self) -> np.ndarray:
        """Item rows that `exclude_history` leaves out: the history and the older rows."""
        return self.history if self.older is None or not len(self.older) else np.concatenate([self.older, self.history])


class Method(Protocol):
    """An evaluated recommender: learn from a TrainSet, then rank items for queries."""

    name: str

    def fit(self, train: TrainSet) -> None: ...

    def close(self) -> None:
        """Release what `fit` built (files, stores); a no-op for in-memory methods."""
        ...

    def recommend(self, queries: Sequence[Query], k: int, candidates: np.ndarray | None = None,
                  exclude_history: bool = True) -> list[np.ndarray]:
        """Top-k item rows per query, best first, from `candidates` (all items when None)."""
        ...


class ScoringMethod:
    """A method that scores every item; ties go to the more popular item, then to a seeded coin.

    Subclasses implement `_fit` and `scores`.
    """

    name = "scoring"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self._tiebreak: np.ndarray | None = None

    def fit(self, train: TrainSet) -> None:
        rng = np.random.default_rng(self.seed)
        order = np.lexsort((rng.random(train.n_items), -train.popularity()))
        self._tiebreak = np.empty(train.n_items, dtype=np.int64)
        self._tiebreak[order] = np.arange(train.n_items)
        self._fit(train)

    def _fit(self, train: TrainSet) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        """Scores, shape (len(queries), n_items), higher is better."""
        raise NotImplementedError

    def recommend(self, queries: Sequence[Query], k: int, candidates: np.ndarray | None = None,
                  exclude_history: bool = True) -> list[np.ndarray]:
        if self._tiebreak is None:
            raise ValueError(f"{self.name}: fit must be called before recommend")
        out: list[np.ndarray] = []
        for start in range(0, len(queries), SCORE_CHUNK):
            chunk = queries[start:start + SCORE_CHUNK]
            for query, row in zip(chunk, self.scores(chunk)):
                exclude = query.masked() if exclude_history else None
                out.append(top_k(row, k, self._tiebreak, candidates, exclude))
        return out


def top_k(scores: np.ndarray, k: int, tiebreak: np.ndarray, candidates: np.ndarray | None = None,
          exclude: np.ndarray | None = None) -> np.ndarray:
    """The k best rows by score (ties by ascending `tiebreak`), from candidates minus exclude."""
    pool = np.arange(scores.shape[0]) if candidates is None else np.asarray(candidates)
    if exclude is not None and len(exclude):
        pool = pool[~np.isin(pool, exclude)]
    order = np.lexsort((tiebreak[pool], -scores[pool]))
    return pool[order[:k]]


def history_matrix(queries: Sequence[Query], n_items: int) -> csr_matrix:
    """Binary matrix of the queries' histories, shape (len(queries), n_items), float32."""
    indptr = np.cumsum([0] + [len(q.history) for q in queries])
    indices = np.concatenate([q.history for q in queries]) if queries else np.zeros(0, np.int64)
    m = csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(queries), n_items))
    m.sum_duplicates()
    m.data[:] = 1.0
    return m

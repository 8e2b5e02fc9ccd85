"""The methods of the replay: each recommends before an event, then is told it, in time order.

Items enter a player's catalog at their first event (`add_items`), never earlier.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine import Engine
from engine.encoder import TextEncoder

from .baselines.base import TrainSet, top_k
from .datasets import EvalDataset
from .kindling_method import engine_config, open_engine

REPLAY_METHODS: tuple[str, ...] = ("kindling", "kindling-frozen", "popularity", "cooc")


class Player:
    """A method in the replay: recommend for a user, then be told what they did."""

    name = "player"

    def add_items(self, rows: np.ndarray) -> None:
        """Items (rows) that enter the catalog now; recommendable from the next call on."""
        raise NotImplementedError

    def recommend(self, user: int, k: int, consumed: set[int], disliked: set[int]) -> np.ndarray:
        """Top-k item rows, none of them in `consumed` (every item the user has an event on);
        `disliked` is the part of it that was never recorded as a click."""
        raise NotImplementedError

    def record(self, user: int, item: int, timestamp: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class EnginePlayer(Player):
    """The engine learning online, through its public API: recommend(exclude_seen), then record."""

    def __init__(self, name: str, engine: Engine, ds: EvalDataset) -> None:
        self.name, self._engine, self._ds = name, engine, ds
        self._items, self._users = ds.item_ids, ds.user_ids
        self._row_of = {item_id: row for row, item_id in enumerate(ds.item_ids)}

    def add_items(self, rows: np.ndarray) -> None:
        self._engine.add_items([self._ds.items[r] for r in rows])

    def recommend(self, user: int, k: int, consumed: set[int], disliked: set[int]) -> np.ndarray:
        recs = self._engine.recommend(self._users[user], k=k, profile=self._ds.profile(user),
                                      exclude_seen=True, exclude=[self._items[r] for r in disliked])
        return self._rows(recs)

    def _rows(self, recs: list) -> np.ndarray:
        return np.array([self._row_of[r.item_id] for r in recs], dtype=np.int64)

    def record(self, user: int, item: int, timestamp: int) -> None:
        self._engine.record(self._users[user], self._items[item], "click", timestamp=int(timestamp))

    def close(self) -> None:
        self._engine.close(save=False)


class FrozenEnginePlayer(EnginePlayer):
    """The fair counterfactual: a store fitted at the cut with online updates off, asked with
    `history=` the user's positives so far (before the cut, then replayed, oldest first). Model
    and item statistics stay as they were at the cut; only the user vector folds in the clicks.
    Nothing is recorded."""

    def __init__(self, name: str, engine: Engine, ds: EvalDataset, train: TrainSet) -> None:
        super().__init__(name, engine, ds)
        self._history: dict[int, list[str]] = {}
        for u, i in zip(train.events.user.tolist(), train.events.item.tolist()):
            self._history.setdefault(u, []).append(self._items[i])

    def recommend(self, user: int, k: int, consumed: set[int], disliked: set[int]) -> np.ndarray:
        recs = self._engine.recommend(self._users[user], k=k, profile=self._ds.profile(user),
                                      history=self._history.get(user, []), exclude_seen=True,
                                      exclude=[self._items[r] for r in disliked])
        return self._rows(recs)

    def record(self, user: int, item: int, timestamp: int) -> None:
        self._history.setdefault(user, []).append(self._items[item])


class ScorePlayer(Player):
    """A player that scores every item; items not yet in the catalog are masked, ties go to the
    lower item row. Subclasses implement `scores`."""

    def __init__(self, live: np.ndarray) -> None:
        self._live = np.asarray(live, bool).copy()
        self._tiebreak = np.arange(len(self._live))

    def add_items(self, rows: np.ndarray) -> None:
        self._live[rows] = True

    def scores(self, user: int) -> np.ndarray:
        """Scores, shape (n_items,), higher is better."""
        raise NotImplementedError

    def recommend(self, user: int, k: int, consumed: set[int], disliked: set[int]) -> np.ndarray:
        exclude = np.fromiter(consumed, dtype=np.int64, count=len(consumed))
        return top_k(self.scores(user), k, self._tiebreak, np.flatnonzero(self._live), exclude)


class PopularityPlayer(ScorePlayer):
    """Most positives so far, counted online from the training part on."""

    name = "popularity"

    def __init__(self, train: TrainSet, live: np.ndarray | None = None) -> None:
        super().__init__(np.ones(train.n_items, bool) if live is None else live)
        self._counts = train.popularity().astype(np.float64)

    def scores(self, user: int) -> np.ndarray:
        return self._counts

    def record(self, user: int, item: int, timestamp: int) -> None:
        self._counts[item] += 1


class CoocPlayer(PopularityPlayer):
    """Online co-occurrence: score(j) = log(1 + sum over the user's positives i of C[i, j]) +
    log(1 + pop(j)), where C[i, j] counts the users with positives on both i and j and pop(j) the
    positives on j, both counted from the training part and then every replayed positive.

    The user-item matrix is held dense (users x items, float32): C's row sums for a user are
    (X[:, P] summed over P) @ X, over the users who share an item with them.
    """

    name = "cooc"

    def __init__(self, train: TrainSet, live: np.ndarray | None = None) -> None:
        super().__init__(train, live)
        self._x = np.zeros((train.n_users, train.n_items), np.float32)
        self._x[train.events.user, train.events.item] = 1.0

    def scores(self, user: int) -> np.ndarray:
        liked = np.flatnonzero(self._x[user])
        co = np.zeros(self._x.shape[1], np.float32)
        if len(liked):
            overlap = self._x[:, liked].sum(axis=1)
            sharing = np.flatnonzero(overlap)
            # a gather of the sharing rows pays only when few users share an item with this one
            co = overlap[sharing] @ self._x[sharing] if len(sharing) * 4 < len(overlap) else overlap @ self._x
        return np.log1p(co.astype(np.float64)) + np.log1p(self._counts)

    def record(self, user: int, item: int, timestamp: int) -> None:
        super().record(user, item, timestamp)
        self._x[user, item] = 1.0


def build_players(names: Sequence[str], train: TrainSet, ds: EvalDataset, workdir: Path,
                  encoder: Callable[[], TextEncoder], seed: int, live: np.ndarray) -> list[Player]:
    """The requested players, each with the items of `live` (a mask over the catalog) in its
    catalog. The two engines are separate stores fitted on the same events; `encoder` is called
    only when an engine is asked for."""
    players: list[Player] = []
    items = [ds.items[r] for r in np.flatnonzero(live)]
    for name in names:
        if name == "popularity":
            players.append(PopularityPlayer(train, live))
        elif name == "cooc":
            players.append(CoocPlayer(train, live))
        elif name in ("kindling", "kindling-frozen"):
            online = name == "kindling"
            eng = open_engine(workdir / name, train, encoder(), engine_config(seed, online_updates=online), items)
            players.append(EnginePlayer(name, eng, ds) if online else FrozenEnginePlayer(name, eng, ds, train))
        else:
            raise ValueError(f"replay methods are {', '.join(REPLAY_METHODS)}; got {name!r}")
    return players


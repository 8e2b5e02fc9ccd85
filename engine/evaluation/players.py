"""The methods of the replay: each recommends before an event, then is told it, in time order.

Items enter a player's catalog at their first event (`add_items`), never earlier.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from engine import Engine
from engine.text.encoder import TextEncoder

from .baselines.base import TrainSet
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
        self._engine.settle()  # the next answer reflects this click's step, whatever the timing

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


def top_rows(scores: np.ndarray, k: int, allowed: np.ndarray) -> np.ndarray:
    """The k best rows among `allowed` (a mask) by score, ties to the lower row: the order of
    `top_k(scores, k, arange(n), candidates)`, found with a partition instead of a full sort."""
    k = min(k, int(allowed.sum()))
    if k <= 0:
        return np.zeros(0, np.int64)
    s = np.where(allowed, scores, -np.inf)
    kth = np.partition(s, len(s) - k)[len(s) - k]
    head = np.flatnonzero(s > kth)
    rows = np.concatenate([head, np.flatnonzero((s == kth) & allowed)[: k - len(head)]])
    return rows[np.lexsort((rows, -s[rows]))]


class ScorePlayer(Player):
    """A player that scores every item; items not yet in the catalog are masked, ties go to the
    lower item row. Subclasses implement `scores`."""

    def __init__(self, live: np.ndarray) -> None:
        self._live = np.asarray(live, bool).copy()

    def add_items(self, rows: np.ndarray) -> None:
        self._live[rows] = True

    def scores(self, user: int) -> np.ndarray:
        """Scores, shape (n_items,), higher is better."""
        raise NotImplementedError

    def recommend(self, user: int, k: int, consumed: set[int], disliked: set[int]) -> np.ndarray:
        allowed = self._live.copy()
        allowed[np.fromiter(consumed, dtype=np.int64, count=len(consumed))] = False
        return top_rows(self.scores(user), k, allowed)


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

    The user-item matrix is held dense, both ways (float32): the sum over a user's positives of
    C[i, :] is (sum of their items' user columns) @ X, and items the user has are never ranked,
    so C's diagonal does not matter.
    """

    name = "cooc"

    def __init__(self, train: TrainSet, live: np.ndarray | None = None) -> None:
        super().__init__(train, live)
        self._x = np.zeros((train.n_users, train.n_items), np.float32)
        self._x[train.events.user, train.events.item] = 1.0
        self._xt = np.ascontiguousarray(self._x.T)
        self._liked: dict[int, list[int]] = {}
        for u, i in dict.fromkeys(zip(train.events.user.tolist(), train.events.item.tolist())):
            self._liked.setdefault(u, []).append(i)

    def scores(self, user: int) -> np.ndarray:
        liked = self._liked.get(user)
        co = np.zeros(self._x.shape[1], np.float32)
        if liked:
            overlap = self._xt[liked].sum(axis=0)
            sharing = np.flatnonzero(overlap)
            # a gather of the sharing rows pays only when few users share an item with this one
            co = overlap[sharing] @ self._x[sharing] if len(sharing) * 4 < len(overlap) else overlap @ self._x
        return np.log1p(co.astype(np.float64)) + np.log1p(self._counts)

    def record(self, user: int, item: int, timestamp: int) -> None:
        super().record(user, item, timestamp)
        if not self._x[user, item]:
            self._x[user, item] = self._xt[item, user] = 1.0
            self._liked.setdefault(user, []).append(item)


def build_players(names: Sequence[str], train: TrainSet, ds: EvalDataset, workdir: Path,
                  encoder: Callable[[], TextEncoder], seed: int, live: np.ndarray,
                  timings: dict[str, float] | None = None) -> list[Player]:
    """The requested players, each with the items of `live` (a mask over the catalog) in its
    catalog; `timings[name]` gets the seconds each took to set up. `encoder` is called only when
    an engine is asked for.

    The frozen engine is the online engine's store as fitted, copied before the replay (so both
    start from the same model: two fits differ in their random draws), or, alone, a store fitted
    with `online_updates=False`. It only ever gets `add_items` and stateless requests, so either
    way nothing it learned changes.
    """
    players: dict[str, Player] = {}
    timings = {} if timings is None else timings
    for name in names:
        start = time.perf_counter()
        players[name] = _player(name, train, ds, workdir, encoder, seed, live, players)
        timings[name] = round(time.perf_counter() - start, 2)
    return list(players.values())


def _player(name: str, train: TrainSet, ds: EvalDataset, workdir: Path, encoder: Callable[[], TextEncoder],
            seed: int, live: np.ndarray, built: dict[str, Player]) -> Player:
    if name == "popularity":
        return PopularityPlayer(train, live)
    if name == "cooc":
        return CoocPlayer(train, live)
    if name not in ("kindling", "kindling-frozen"):
        raise ValueError(f"replay methods are {', '.join(REPLAY_METHODS)}; got {name!r}")
    items = [ds.items[r] for r in np.flatnonzero(live)]
    if name == "kindling":
        return EnginePlayer(name, open_engine(workdir / name, train, encoder(), engine_config(seed), items), ds)
    if "kindling" in built:  # the online store as fitted: it has recorded nothing yet
        shutil.copytree(workdir / "kindling", workdir / name)
        eng = Engine.open(workdir / name, encoder=encoder())
    else:
        eng = open_engine(workdir / name, train, encoder(), engine_config(seed, online_updates=False), items)
    return FrozenEnginePlayer(name, eng, ds, train)

"""The engine under evaluation, driven only through its public API, as an application would."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from engine import Config, Engine, Event, Item
from engine.text.encoder import TextEncoder

from .baselines.base import Query, TrainSet


def engine_config(seed: int, **overrides: object) -> Config:
    """The evaluated settings: the defaults, seeded; no fsync per event (the store is throwaway);
    BLAS left on its threads (`blas_threads=0`: the baselines in the same process solve large
    systems, EASE's inverse, ALS; the counts change speed, not which items rank)."""
    return Config(seed=seed, fsync=False, **{"blas_threads": 0, **overrides})


def click_events(train: TrainSet) -> list[Event]:
    """Training positives as the click events an application would have logged, in time order."""
    ev = train.events
    return [Event(str(train.user_ids[u]), str(train.items[i].item_id), "click", 1.0, int(t))
            for u, i, t in zip(ev.user, ev.item, ev.timestamp)]


def open_engine(path: Path, train: TrainSet, encoder: TextEncoder, config: Config,
                items: Sequence[Item] | None = None) -> Engine:
    """A new store holding `items` (default: the whole catalog), the training users' profiles and
    the training positives as their history, fitted on them."""
    return fitted_engine(path, train, encoder, config, items)[0]


def fitted_engine(path: Path, train: TrainSet, encoder: TextEncoder, config: Config,
                  items: Sequence[Item] | None = None) -> tuple[Engine, dict]:
    """`open_engine`, with what `fit` returned."""
    eng = Engine.create(path, config=config, encoder=encoder)
    eng.add_items(train.items if items is None else items)
    for user_id, text in sorted(train.profiles.items()):
        eng.set_profile(user_id, text)
    events = click_events(train)
    eng.import_events(events)
    return eng, eng.fit(events, progress=False)


class KindlingMethod:
    """`fit` builds a fresh store under `workdir`; `recommend` asks the engine.

    A query for a user training never saw (user == -1) is a stateless request: the engine ranks
    for a transient user built from the query's history (`recommend(history=...)`) and records
    nothing, so each test user is scored by the engine as it stood after `fit` plus their own
    revealed clicks, and no test user's query can change another's ranking.

    A query for a training user is the online path: the clicks of its history that the store has
    not seen (next-item: the one after the training positives) are first recorded, as an
    application would, then the stored user is asked once. With `stateless=True` (the method
    "kindling-stateless") every query is a stateless request with its history instead.
    """

    name = "kindling"

    def __init__(self, workdir: str | Path, encoder: TextEncoder, seed: int = 0,
                 config: Config | None = None, stateless: bool = False) -> None:
        self.workdir = Path(workdir)
        self.encoder = encoder
        self.config = config or engine_config(seed)
        self.stateless = stateless
        if stateless:
            self.name = "kindling-stateless"
        self._engine: Engine | None = None
        self._fits = 0

    def fit(self, train: TrainSet) -> None:
        self.close()
        self._fits += 1
        path = self.workdir / f"{self.name}-{self._fits}"
        self._engine, summary = fitted_engine(path, train, self.encoder, self.config)
        self.chosen = {k: summary[k] for k in ("reranker_expert", "reranker_warm_start", "reranker_buckets",
                                               "reranker_valid_recall", "reranker_examples", "reranker_mlp",
                                               "reranker_mlp_gate", "profile_weight",
                                               "profile_weight_users", "profile_weight_recalls")
                       if k in summary}
        self._item_ids = [it.item_id for it in train.items]
        self._row_of = {item_id: row for row, item_id in enumerate(self._item_ids)}
        self._known = _pairs(train.events.user, train.events.item)

    def recommend(self, queries: Sequence[Query], k: int, candidates: np.ndarray | None = None,
                  exclude_history: bool = True) -> list[np.ndarray]:
        if self._engine is None:
            raise ValueError(f"{self.name}: fit must be called before recommend")
        cand = None if candidates is None else [self._item_ids[r] for r in candidates]
        out = []
        for q in queries:
            if not q.name:
                raise ValueError(f"{self.name}: every query needs the user's external id in `name`")
            older = None if q.older is None or not exclude_history else [self._item_ids[r] for r in q.older]
            if self.stateless or q.user < 0:
                history = [self._item_ids[r] for r in q.history]
            else:
                history = None
                self._record_new(q)
            recs = self._engine.recommend(q.name, k=k, profile=q.profile, exclude_seen=exclude_history,
                                          candidates=cand, exclude=older, history=history)
            out.append(np.array([self._row_of[r.item_id] for r in recs], dtype=np.int64))
        return out

    def _record_new(self, q: Query) -> None:
        """Record, as clicks in time order, the query's history items the store has not seen."""
        times = q.times if q.times is not None else [None] * len(q.history)
        for row, t in zip(q.history, times):
            if (q.user, int(row)) not in self._known:
                self._engine.record(q.name, self._item_ids[row], "click", 1.0, None if t is None else int(t))
                self._known.add((q.user, int(row)))
        self._engine.settle()  # their reranker steps, taken now: the same answer whatever the timing

    def close(self) -> None:
        """Close the current store (its directory stays under `workdir`)."""
        if self._engine is not None:
            self._engine.close(save=False)
            self._engine = None


def _pairs(users: np.ndarray, items: np.ndarray) -> set[tuple[int, int]]:
    return set(zip(users.tolist(), items.tolist()))

"""The replay protocol: learn from the past, then recommend before each later positive, in time order."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.text.encoder import TextEncoder

from .baselines.base import TrainSet
from .datasets import EvalDataset, EventTable, positives
from .players import REPLAY_METHODS, Player, build_players
from .protocols import header
from .splits import ReplaySplit, check_split_kind, replay_split, replay_validation

__all__ = ["REPLAY_METHODS", "ReplayLog", "catalog_at_cut", "choose_replay", "replay", "run_replay"]


@dataclass
class ReplayLog:
    """Per replayed positive: its user (row), a hit per player, and whether user or item were
    cold at the cut (no event of any kind before it)."""

    user: np.ndarray
    cold_user: np.ndarray
    cold_item: np.ndarray
    timestamp: np.ndarray
    hits: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def choose_replay(events: EventTable, split_kind: str = "test") -> ReplaySplit:
    """The replay split, or its validation split (the same cut applied to the events before it)."""
    check_split_kind(split_kind)
    return replay_split(events) if split_kind == "test" else replay_validation(events)


def catalog_at_cut(split: ReplaySplit, n_items: int) -> np.ndarray:
    """Items with an event of any kind before the cut, as a mask of shape (n_items,): the catalog
    the players start with. Every other item enters at its first event."""
    live = np.zeros(n_items, bool)
    live[split.train.item] = True
    return live


class _Arrivals:
    """The items whose first event is in the stream, released when the replay reaches its time."""

    def __init__(self, stream: EventTable, live: np.ndarray) -> None:
        items, first = np.unique(stream.item, return_index=True)
        new = ~live[items]
        order = np.argsort(first[new], kind="stable")
        self._rows, self._times = items[new][order], stream.timestamp[first[new][order]]
        self._next = 0

    def due(self, t: int) -> np.ndarray:
        """Rows whose first event is at or before time t and not released yet."""
        end = int(np.searchsorted(self._times, t, side="right"))
        rows, self._next = self._rows[self._next:end], max(end, self._next)
        return rows


def replay(ds: EvalDataset, players: Sequence[Player], split: ReplaySplit, min_value: float | None,
           k: int, progress: Callable[[int], None] | None = None) -> ReplayLog:
    """Walk the stream in time order: items whose first event has come are added to every
    player, then before each positive every player recommends and is told the event.
    Non-positive events only mark the item as consumed."""
    stream = split.stream
    pos = _positive_mask(stream, min_value)
    consumed, disliked = _consumption(split.train, min_value)
    arrivals = _Arrivals(stream, catalog_at_cut(split, ds.n_items))
    log = ReplayLog(stream.user[pos], ~np.isin(stream.user[pos], split.train.user),
                    ~np.isin(stream.item[pos], split.train.item), stream.timestamp[pos])
    hits = {p.name: np.zeros(int(pos.sum()), bool) for p in players}
    seconds = {p.name: 0.0 for p in players}
    j = 0
    for i in range(len(stream)):
        user, item, ts = int(stream.user[i]), int(stream.item[i]), int(stream.timestamp[i])
        new = arrivals.due(ts)
        for p in players:
            start = time.perf_counter()
            if len(new):
                p.add_items(new)
            if pos[i]:
                hits[p.name][j] = item in p.recommend(user, k, consumed.setdefault(user, set()),
                                                      disliked.setdefault(user, set()))
                p.record(user, item, ts)
            seconds[p.name] += time.perf_counter() - start
        if pos[i]:
            j += 1
            if progress is not None:
                progress(1)
        else:
            disliked.setdefault(user, set()).add(item)
        consumed.setdefault(user, set()).add(item)
    log.hits, log.seconds = hits, seconds
    return log


def _consumption(train: EventTable, min_value: float | None) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
    """Per user: every item with an event before the cut, and those not positive."""
    consumed: dict[int, set[int]] = {}
    disliked: dict[int, set[int]] = {}
    pos = _positive_mask(train, min_value)
    for u, i, p in zip(train.user.tolist(), train.item.tolist(), pos.tolist()):
        consumed.setdefault(u, set()).add(i)
        if not p:
            disliked.setdefault(u, set()).add(i)
    return consumed, disliked


def _positive_mask(events: EventTable, min_value: float | None) -> np.ndarray:
    return np.ones(len(events), bool) if min_value is None else events.value >= min_value


def run_replay(ds: EvalDataset, workdir: str | Path, encoder: Callable[[], TextEncoder], *, seed: int = 0,
               k: int = 20, min_value: float | None = None, methods: Sequence[str] = REPLAY_METHODS,
               split_kind: str = "test", progress: Callable[[str], None] | None = None) -> tuple[dict, ReplayLog]:
    """The replay protocol's summary (the JSON object) and its per-event log (for plots)."""
    say = progress or (lambda _: None)
    split = choose_replay(ds.events, split_kind)
    train = TrainSet(positives(split.train, min_value), ds.items, ds.n_users, ds.user_ids,
                     profiles=ds.profiles_of(split.train))
    live = catalog_at_cut(split, ds.n_items)
    fit_s: dict[str, float] = {}
    players = build_players(methods, train, ds, Path(workdir), encoder, seed, live, fit_s)
    say(f"replay: {len(players)} method(s) ready ({sum(fit_s.values()):.1f} s)")
    log = _replay_with_bar(ds, players, split, min_value, k)
    out = header(ds, "replay", seed, k, min_value, split_kind)
    out["split"] = _split_counts(ds, split, train, live, log)
    out["results"] = {name: _hit_rates(h, log, k) for name, h in log.hits.items()}
    out["timings_s"] = {n: {"fit": fit_s[n], "rank": round(log.seconds[n], 2)} for n in log.hits}
    out["per_user"] = replay_per_user(ds, log)
    for name, res in out["results"].items():
        say(f"replay {name}: {res} (fit {fit_s[name]:.1f} s, replay {log.seconds[name]:.1f} s)")
    return out, log


def _replay_with_bar(ds: EvalDataset, players: Sequence[Player], split: ReplaySplit,
                     min_value: float | None, k: int) -> ReplayLog:
    from tqdm.auto import tqdm

    total = int(_positive_mask(split.stream, min_value).sum())
    try:
        with tqdm(total=total, desc="replay", unit="event", disable=None, leave=False) as bar:
            return replay(ds, players, split, min_value, k, progress=bar.update)
    finally:
        for p in players:
            p.close()


def _split_counts(ds: EvalDataset, split: ReplaySplit, train: TrainSet, live: np.ndarray,
                  log: ReplayLog) -> dict:
    return {"items": ds.n_items, "items_at_cut": int(live.sum()),
            "items_entering": int(len(np.setdiff1d(split.stream.item, np.flatnonzero(live)))),
            "cut_timestamp": split.cut, "train_events": len(split.train),
            "train_positives": len(train.events), "replayed_positives": int(len(log.cold_user)),
            "cold_user_positives": int(log.cold_user.sum()), "cold_item_positives": int(log.cold_item.sum())}


def replay_per_user(ds: EvalDataset, log: ReplayLog) -> dict:
    """Per replayed user (sorted by row): their positives, how many were on cold items, whether
    the user was cold, and each player's hits on all of them and on the cold-item ones."""
    users, inv = np.unique(log.user, return_inverse=True)

    def count(mask: np.ndarray) -> list[int]:
        return np.bincount(inv, weights=mask.astype(np.float64), minlength=len(users)).astype(int).tolist()

    return {"users": [str(ds.user_ids[u]) for u in users],
            "events": count(np.ones(len(inv), bool)),
            "cold_item_events": count(log.cold_item),
            "cold_user": [int(c) for c in np.isin(users, log.user[log.cold_user])],
            "results": {name: {"hits": count(h), "cold_item_hits": count(h & log.cold_item)}
                        for name, h in log.hits.items()}}


def _hit_rates(hits: np.ndarray, log: ReplayLog, k: int) -> dict[str, float | None]:
    def rate(mask: np.ndarray) -> float | None:
        return float(hits[mask].mean()) if mask.any() else None

    return {f"hit_rate@{k}": rate(np.ones_like(hits)), f"hit_rate@{k}_cold_users": rate(log.cold_user),
            f"hit_rate@{k}_cold_items": rate(log.cold_item)}

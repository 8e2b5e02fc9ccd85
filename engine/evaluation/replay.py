"""The replay protocol: learn from the past, then recommend before each later positive, in time order."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine import Engine
from engine.encoder import TextEncoder

from .baselines.base import TrainSet, top_k
from .datasets import EvalDataset, EventTable, positives
from .kindling_method import engine_config, open_engine
from .splits import replay_split

REPLAY_METHODS: tuple[str, ...] = ("kindling", "kindling-frozen", "popularity")


class Player:
    """A method in the replay: recommend for a user, then be told what they did."""

    name = "player"

    def recommend(self, user: int, k: int, consumed: set[int], disliked: set[int]) -> np.ndarray:
        """Top-k item rows, none of them in `consumed` (every item the user has an event on);
        `disliked` is the part of it that was never recorded as a click."""
        raise NotImplementedError

    def record(self, user: int, item: int, timestamp: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class EnginePlayer(Player):
    """The engine through its public API: recommend(exclude_seen) then record(click)."""

    def __init__(self, name: str, engine: Engine, ds: EvalDataset) -> None:
        self.name, self._engine, self._ds = name, engine, ds
        self._items, self._users = ds.item_ids, ds.user_ids
        self._row_of = {item_id: row for row, item_id in enumerate(ds.item_ids)}

    def recommend(self, user: int, k: int, consumed: set[int], disliked: set[int]) -> np.ndarray:
        recs = self._engine.recommend(self._users[user], k=k, profile=self._ds.profile(user),
                                      exclude_seen=True, exclude=[self._items[r] for r in disliked])
        return np.array([self._row_of[r.item_id] for r in recs], dtype=np.int64)

    def record(self, user: int, item: int, timestamp: int) -> None:
        self._engine.record(self._users[user], self._items[item], "click", timestamp=int(timestamp))

    def close(self) -> None:
        self._engine.close(save=False)


class PopularityPlayer(Player):
    """Most positives so far, counted online; ties to the lower item row."""

    name = "popularity"

    def __init__(self, train: TrainSet) -> None:
        self._counts = train.popularity().astype(np.float64)
        self._tiebreak = np.arange(train.n_items)

    def recommend(self, user: int, k: int, consumed: set[int], disliked: set[int]) -> np.ndarray:
        exclude = np.fromiter(consumed, dtype=np.int64, count=len(consumed))
        return top_k(self._counts, k, self._tiebreak, exclude=exclude)

    def record(self, user: int, item: int, timestamp: int) -> None:
        self._counts[item] += 1


@dataclass
class ReplayLog:
    """Per replayed positive: a hit per player, and whether user or item were cold at the cut."""

    cold_user: np.ndarray
    cold_item: np.ndarray
    timestamp: np.ndarray
    hits: dict[str, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def build_players(names: Sequence[str], train: TrainSet, ds: EvalDataset, workdir: Path,
                  encoder: Callable[[], TextEncoder], seed: int) -> list[Player]:
    """The requested players; the two engines are separate stores fitted on the same events.
    `encoder` is called only when an engine is asked for."""
    players: list[Player] = []
    for name in names:
        if name == "popularity":
            players.append(PopularityPlayer(train))
        elif name in ("kindling", "kindling-frozen"):
            config = engine_config(seed, online_updates=name == "kindling")
            players.append(EnginePlayer(name, open_engine(workdir / name, train, encoder(), config), ds))
        else:
            raise ValueError(f"replay methods are {', '.join(REPLAY_METHODS)}; got {name!r}")
    return players


def replay(ds: EvalDataset, players: Sequence[Player], min_value: float | None, k: int,
           progress: Callable[[int], None] | None = None) -> ReplayLog:
    """Walk the events after the cut in time order: before each positive every player recommends,
    then it is recorded. Non-positive events only mark the item as consumed."""
    split = replay_split(ds.events)
    stream = split.stream
    pos = _positive_mask(stream, min_value)
    consumed, disliked = _consumption(split.train, min_value)
    log = ReplayLog(~np.isin(stream.user[pos], split.train.user),
                    ~np.isin(stream.item[pos], split.train.item), stream.timestamp[pos])
    hits = {p.name: np.zeros(int(pos.sum()), bool) for p in players}
    seconds = {p.name: 0.0 for p in players}
    j = 0
    for i in range(len(stream)):
        user, item = int(stream.user[i]), int(stream.item[i])
        seen, bad = consumed.setdefault(user, set()), disliked.setdefault(user, set())
        if pos[i]:
            for p in players:
                start = time.perf_counter()
                hits[p.name][j] = item in p.recommend(user, k, seen, bad)
                p.record(user, item, int(stream.timestamp[i]))
                seconds[p.name] += time.perf_counter() - start
            j += 1
            if progress is not None:
                progress(1)
        else:
            bad.add(item)
        seen.add(item)
    log.hits, log.seconds = hits, seconds
    return log


def _consumption(train, min_value: float | None) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
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
               k: int = 20, min_value: float | None = None,
               methods: Sequence[str] = REPLAY_METHODS,
               progress: Callable[[str], None] | None = None) -> tuple[dict, ReplayLog]:
    """The replay protocol's summary (the JSON object) and its per-event log (for plots)."""
    say = progress or (lambda _: None)
    split = replay_split(ds.events)
    train = TrainSet(positives(split.train, min_value), ds.items, ds.n_users, ds.user_ids)
    start = time.perf_counter()
    players = build_players(methods, train, ds, Path(workdir), encoder, seed)
    setup = round(time.perf_counter() - start, 2)
    say(f"replay: {len(players)} method(s) ready ({setup:.1f} s)")
    from tqdm.auto import tqdm

    total = int(_positive_mask(split.stream, min_value).sum())
    try:
        with tqdm(total=total, desc="replay", unit="event", disable=None, leave=False) as bar:
            log = replay(ds, players, min_value, k, progress=bar.update)
    finally:
        for p in players:
            p.close()
    out = {"dataset": ds.name, "protocol": "replay", "seed": seed, "k": k, "min_value": min_value}
    out["split"] = {"items": ds.n_items, "cut_timestamp": split.cut, "train_events": len(split.train),
                    "train_positives": len(train.events), "replayed_positives": int(len(log.cold_user)),
                    "cold_user_positives": int(log.cold_user.sum()),
                    "cold_item_positives": int(log.cold_item.sum())}
    out["results"] = {name: _hit_rates(h, log, k) for name, h in log.hits.items()}
    out["timings_s"] = {"setup": setup, **{n: round(s, 2) for n, s in log.seconds.items()}}
    for name, res in out["results"].items():
        say(f"replay {name}: {res} ({out['timings_s'][name]:.1f} s)")
    return out, log


def _hit_rates(hits: np.ndarray, log: ReplayLog, k: int) -> dict[str, float | None]:
    def rate(mask: np.ndarray) -> float | None:
        return float(hits[mask].mean()) if mask.any() else None

    return {f"hit_rate@{k}": rate(np.ones_like(hits)), f"hit_rate@{k}_cold_users": rate(log.cold_user),
            f"hit_rate@{k}_cold_items": rate(log.cold_item)}


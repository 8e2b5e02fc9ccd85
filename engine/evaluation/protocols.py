"""The item-cold and user-cold protocols: split, fit every method, rank, score, report as a dict."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from .baselines.base import Method, Query, TrainSet
from .datasets import EvalDataset, EventTable, positives
from .metrics import ndcg_at_k, recall_at_k
from .splits import REVEALS, UserColdSplit, item_cold_split, user_cold_split

log = logging.getLogger(__name__)

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def _header(ds: EvalDataset, protocol: str, seed: int, k: int, min_value: float | None) -> dict:
    return {"dataset": ds.name, "protocol": protocol, "seed": seed, "k": k, "min_value": min_value}


def _histories(train: EventTable, users: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(item rows, timestamps) of each user's training positives, in time order."""
    order = np.argsort(train.user, kind="stable")
    user, item, ts = train.user[order], train.item[order], train.timestamp[order]
    lo, hi = np.searchsorted(user, users), np.searchsorted(user, users, side="right")
    return {int(u): (item[a:b], ts[a:b]) for u, a, b in zip(users, lo, hi)}


def score_rankings(ranked: Sequence[np.ndarray], targets: Sequence[np.ndarray], k: int) -> dict[str, float]:
    """recall@k and ndcg@k averaged over users (rankings and targets are aligned)."""
    if not ranked:
        return {f"recall@{k}": 0.0, f"ndcg@{k}": 0.0}
    return {f"recall@{k}": float(np.mean([recall_at_k(r, t, k) for r, t in zip(ranked, targets)])),
            f"ndcg@{k}": float(np.mean([ndcg_at_k(r, t, k) for r, t in zip(ranked, targets)]))}


class _Clock:
    """Times a method's fit and ranking into timings[name] = {"fit": s, "rank": s}; closes it."""

    def __init__(self, timings: dict, method: Method) -> None:
        self.timings, self.method = timings, method

    def __enter__(self) -> _Clock:
        self.start = self.mark = time.perf_counter()
        return self

    def fitted(self) -> None:
        self.mark = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        end = time.perf_counter()
        self.method.close()
        self.timings[self.method.name] = {"fit": round(self.mark - self.start, 2),
                                          "rank": round(end - self.mark, 2)}


def _seconds(t: dict) -> str:
    return f"fit {t['fit']:.1f} s, rank {t['rank']:.1f} s"


def _short(metrics: dict) -> str:
    return ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())


def run_item_cold(ds: EvalDataset, methods: Sequence[Method], *, seed: int = 0, k: int = 20,
                  min_value: float | None = None, progress: Progress = _quiet) -> dict:
    """Each test user ranks only the cold items, from their training positives."""
    split = item_cold_split(positives(ds.events, min_value), np.random.default_rng(seed))
    train = TrainSet(split.train, ds.items, ds.n_users, ds.user_ids)
    hist = _histories(split.train, split.test_users)
    queries = [Query(int(u), hist[int(u)][0], ds.profile(int(u)), str(ds.user_ids[u]), hist[int(u)][1])
               for u in split.test_users]
    targets = [split.targets[int(u)] for u in split.test_users]
    out = _header(ds, "item-cold", seed, k, min_value)
    out["split"] = {"items": ds.n_items, "items_with_positives": split.n_items_with_positives,
                    "cold_items": int(len(split.cold_items)), "test_users": int(len(queries)),
                    "train_positives": len(split.train)}
    out["results"], out["timings_s"] = {}, {}
    for method in methods:
        with _Clock(out["timings_s"], method) as clock:
            method.fit(train)
            clock.fitted()
            ranked = method.recommend(queries, k, candidates=split.cold_items, exclude_history=False)
        out["results"][method.name] = score_rankings(ranked, targets, k)
        progress(f"item-cold {method.name}: {_short(out['results'][method.name])} "
                 f"({_seconds(out['timings_s'][method.name])})")
    return out


def run_user_cold(ds: EvalDataset, methods: Sequence[Method], *, seed: int = 0, k: int = 20,
                  min_value: float | None = None, reveals: Sequence[int] = REVEALS,
                  progress: Progress = _quiet) -> dict:
    """Each test user is new; after n revealed positives (time order) they rank all other items."""
    split = user_cold_split(positives(ds.events, min_value), np.random.default_rng(seed))
    train = TrainSet(split.train, ds.items, ds.n_users, ds.user_ids)
    out = _header(ds, "user-cold", seed, k, min_value)
    out["split"] = {"items": ds.n_items, "eligible_users": split.n_eligible,
                    "test_users": int(len(split.test_users)), "train_positives": len(split.train)}
    out["results"] = {f"reveal={n}": {} for n in reveals}
    out["timings_s"] = {}
    for method in methods:
        with _Clock(out["timings_s"], method) as clock:
            method.fit(train)
            clock.fitted()
            for n in reveals:
                queries, targets = _reveal_queries(ds, split, n)
                ranked = method.recommend(queries, k, candidates=None, exclude_history=True)
                out["results"][f"reveal={n}"][method.name] = score_rankings(ranked, targets, k)
        summary = {r: round(v[method.name][f"recall@{k}"], 4) for r, v in out["results"].items()}
        progress(f"user-cold {method.name}: recall@{k} {summary} ({_seconds(out['timings_s'][method.name])})")
    return out


def _reveal_queries(ds: EvalDataset, split: UserColdSplit, n: int) -> tuple[list[Query], list[np.ndarray]]:
    """Each test user is a new user (user row -1) named 'id@new' at every n, so an engine asked at
    n = 0, 1, 3, 5 in turn is told each revealed click once, as an application would tell it."""
    queries, targets = [], []
    for u in split.test_users:
        revealed, times, rest = split.reveal(int(u), n)
        name = f"{ds.user_ids[u]}@new"
        queries.append(Query(-1, revealed, ds.profile(int(u)), name, times))
        targets.append(rest)
    return queries, targets

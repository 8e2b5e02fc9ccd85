"""The item-cold and user-cold protocols: split, fit every method, rank, score, report as a dict."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import numpy as np

from .baselines.base import Method, Query, TrainSet
from .datasets import EvalDataset, EventTable, positives
from .metrics import ndcg_at_k, recall_at_k
from .splits import (
    REVEALS, ItemColdSplit, UserColdSplit, check_split_kind, item_cold_split, item_cold_validation,
    user_cold_split, user_cold_validation,
)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
#: Per-user values in the JSON are rounded to this many digits (the summary is computed from them).
PER_USER_DIGITS = 4


def quiet(_: str) -> None:
    pass


def header(ds: EvalDataset, protocol: str, seed: int, k: int, min_value: float | None,
           split_kind: str) -> dict:
    """The keys every protocol's JSON object starts with."""
    return {"dataset": ds.name, "protocol": protocol, "split_kind": split_kind, "seed": seed, "k": k,
            "min_value": min_value}


def compact(values: np.ndarray) -> list[float]:
    """Per-user values as a JSON list, rounded to PER_USER_DIGITS."""
    return [round(float(v), PER_USER_DIGITS) for v in values]


def choose_item_cold(pos: EventTable, seed: int, split_kind: str = "test") -> ItemColdSplit:
    """The seed's item-cold split, or the validation split carved out of its training part."""
    check_split_kind(split_kind)
    draw = item_cold_split if split_kind == "test" else item_cold_validation
    return draw(pos, np.random.default_rng(seed))


def choose_user_cold(pos: EventTable, seed: int, split_kind: str = "test") -> UserColdSplit:
    """The seed's user-cold split, or the validation split carved out of its training users."""
    check_split_kind(split_kind)
    draw = user_cold_split if split_kind == "test" else user_cold_validation
    return draw(pos, np.random.default_rng(seed))


def _histories(train: EventTable, users: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(item rows, timestamps) of each user's training positives, in time order."""
    order = np.argsort(train.user, kind="stable")
    user, item, ts = train.user[order], train.item[order], train.timestamp[order]
    lo, hi = np.searchsorted(user, users), np.searchsorted(user, users, side="right")
    return {int(u): (item[a:b], ts[a:b]) for u, a, b in zip(users, lo, hi)}


def per_user_scores(ranked: Sequence[np.ndarray], targets: Sequence[np.ndarray], k: int) -> dict[str, np.ndarray]:
    """recall@k and ndcg@k of each user, shape (n_users,) float64 (rankings and targets aligned)."""
    return {f"recall@{k}": np.array([recall_at_k(r, t, k) for r, t in zip(ranked, targets)], np.float64),
            f"ndcg@{k}": np.array([ndcg_at_k(r, t, k) for r, t in zip(ranked, targets)], np.float64)}


def means(per_user: dict[str, np.ndarray]) -> dict[str, float]:
    """The mean of each metric over users (0.0 when there are none)."""
    return {name: float(v.mean()) if len(v) else 0.0 for name, v in per_user.items()}


def score_rankings(ranked: Sequence[np.ndarray], targets: Sequence[np.ndarray], k: int) -> dict[str, float]:
    """recall@k and ndcg@k averaged over users (rankings and targets are aligned)."""
    return means(per_user_scores(ranked, targets, k))


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
                  min_value: float | None = None, split_kind: str = "test",
                  progress: Progress = quiet) -> dict:
    """Each test user ranks only the cold items, from their training positives."""
    split = choose_item_cold(positives(ds.events, min_value), seed, split_kind)
    train = TrainSet(split.train, ds.items, ds.n_users, ds.user_ids, profiles=ds.profiles_of(split.train))
    hist = _histories(split.train, split.test_users)
    queries = [Query(int(u), hist[int(u)][0], ds.profile(int(u)), str(ds.user_ids[u]), hist[int(u)][1])
               for u in split.test_users]
    targets = [split.targets[int(u)] for u in split.test_users]
    out = header(ds, "item-cold", seed, k, min_value, split_kind)
    out["split"] = {"items": ds.n_items, "items_with_positives": split.n_items_with_positives,
                    "cold_items": int(len(split.cold_items)), "test_users": int(len(queries)),
                    "train_positives": len(split.train)}
    users = [str(ds.user_ids[u]) for u in split.test_users]
    return measure(out, methods, train, users, progress,
                   lambda m: m.recommend(queries, k, candidates=split.cold_items, exclude_history=False),
                   lambda ranked: per_user_scores(ranked, targets, k))


def note_chosen(out: dict, method: Method) -> None:
    """Keep in `out["chosen"]` what a method picked on its own validation data, if it says."""
    if getattr(method, "chosen", None):
        out.setdefault("chosen", {})[method.name] = method.chosen


def measure(out: dict, methods: Sequence[Method], train: TrainSet, users: list[str], progress: Progress,
            rank: Callable[[Method], list[np.ndarray]],
            score: Callable[[list[np.ndarray]], dict[str, np.ndarray]]) -> dict:
    """Fit each method, rank with `rank`, score per user with `score`; fills out's "results",
    "timings_s" and "per_user" (aligned with `users`) and returns `out`."""
    out["results"], out["timings_s"] = {}, {}
    per_user = {"users": users, "results": {}}
    for method in methods:
        with _Clock(out["timings_s"], method) as clock:
            method.fit(train)
            clock.fitted()
            ranked = rank(method)
        scores = score(ranked)
        out["results"][method.name] = means(scores)
        per_user["results"][method.name] = {m: compact(v) for m, v in scores.items()}
        note_chosen(out, method)
        progress(f"{out['protocol']} {method.name}: {_short(out['results'][method.name])} "
                 f"({_seconds(out['timings_s'][method.name])})")
    out["per_user"] = per_user
    return out


def run_user_cold(ds: EvalDataset, methods: Sequence[Method], *, seed: int = 0, k: int = 20,
                  min_value: float | None = None, reveals: Sequence[int] = REVEALS,
                  split_kind: str = "test", progress: Progress = quiet) -> dict:
    """Each test user is new; after n revealed positives (time order) they rank all other items."""
    split = choose_user_cold(positives(ds.events, min_value), seed, split_kind)
    train = TrainSet(split.train, ds.items, ds.n_users, ds.user_ids, profiles=ds.profiles_of(split.train))
    out = header(ds, "user-cold", seed, k, min_value, split_kind)
    out["split"] = {"items": ds.n_items, "eligible_users": split.n_eligible,
                    "test_users": int(len(split.test_users)), "train_positives": len(split.train)}
    out["results"] = {f"reveal={n}": {} for n in reveals}
    out["timings_s"] = {}
    per_user = {"users": [str(ds.user_ids[u]) for u in split.test_users],
                "results": {f"reveal={n}": {} for n in reveals}}
    for method in methods:
        with _Clock(out["timings_s"], method) as clock:
            method.fit(train)
            clock.fitted()
            for n in reveals:
                queries, targets = reveal_queries(ds, split, n)
                ranked = method.recommend(queries, k, candidates=None, exclude_history=True)
                scores = per_user_scores(ranked, targets, k)
                out["results"][f"reveal={n}"][method.name] = means(scores)
                per_user["results"][f"reveal={n}"][method.name] = {m: compact(v) for m, v in scores.items()}
        note_chosen(out, method)
        summary = {r: round(v[method.name][f"recall@{k}"], 4) for r, v in out["results"].items()}
        progress(f"user-cold {method.name}: recall@{k} {summary} ({_seconds(out['timings_s'][method.name])})")
    out["per_user"] = per_user
    return out


def reveal_queries(ds: EvalDataset, split: UserColdSplit, n: int) -> tuple[list[Query], list[np.ndarray]]:
    """Each test user as a new user (user row -1, named 'id@new') with their first n positives;
    the targets are the rest. Every query stands alone: a method must not carry one user's
    revealed clicks over to another's ranking."""
    queries, targets = [], []
    for u in split.test_users:
        revealed, times, rest = split.reveal(int(u), n)
        queries.append(Query(-1, revealed, ds.profile(int(u)), f"{ds.user_ids[u]}@new", times))
        targets.append(rest)
    return queries, targets

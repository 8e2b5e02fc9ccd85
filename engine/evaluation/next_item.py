"""The next-item protocol of the text-based sequential recommenders (UniSRec, VQ-Rec, Recformer):
leave-one-out by time, the last 50 positives as the input, the whole catalog ranked with the
history masked, Recall and NDCG at 10 and 50."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .baselines.base import Method, Query, TrainSet
from .datasets import EvalDataset, EventTable, positives
from .metrics import ndcg_at_k, recall_at_k
from .protocols import Progress, quiet, header, measure
from .splits import HISTORY_CAP, NextItemSplit, check_split_kind, next_item_split, next_item_validation

#: The cut-offs the published tables report, whatever `--k` says.
NEXT_ITEM_KS: tuple[int, ...] = (10, 50)


def choose_next_item(pos: EventTable, split_kind: str = "test") -> NextItemSplit:
    """The test split (target = last positive) or the validation split (target = the one before)."""
    check_split_kind(split_kind)
    return (next_item_split if split_kind == "test" else next_item_validation)(pos)


def next_item_queries(ds: EvalDataset, split: NextItemSplit) -> list[Query]:
    """Each evaluated user as the training user they are, with their last HISTORY_CAP positives
    as the input and the older ones masked."""
    queries = []
    for u in split.test_users:
        items, times, older = split.capped(int(u), HISTORY_CAP)
        queries.append(Query(int(u), items, ds.profile(int(u)), str(ds.user_ids[u]), times, older))
    return queries


def score_next_item(ranked: Sequence[np.ndarray], targets: np.ndarray,
                    ks: Sequence[int] = NEXT_ITEM_KS) -> dict[str, np.ndarray]:
    """recall@k (the hit rate: one target) and ndcg@k per user, for each k."""
    out = {}
    for k in ks:
        out[f"recall@{k}"] = np.array([recall_at_k(r, [t], k) for r, t in zip(ranked, targets)], np.float64)
        out[f"ndcg@{k}"] = np.array([ndcg_at_k(r, [t], k) for r, t in zip(ranked, targets)], np.float64)
    return out


def run_next_item(ds: EvalDataset, methods: Sequence[Method], *, seed: int = 0, k: int = 20,
                  min_value: float | None = None, split_kind: str = "test",
                  progress: Progress = quiet) -> dict:
    """Every method learns from the split's training positives (and may early-stop on the
    holdout), then ranks the whole catalog once per evaluated user. `k` is only written in the
    header: the cut-offs are NEXT_ITEM_KS."""
    split = choose_next_item(positives(ds.events, min_value), split_kind)
    train = TrainSet(split.train, ds.items, ds.n_users, ds.user_ids, holdout=split.holdout,
                     profiles=ds.profiles_of(split.train))
    queries = next_item_queries(ds, split)
    out = header(ds, "next-item", seed, k, min_value, split_kind)
    out["ks"] = list(NEXT_ITEM_KS)
    lengths = np.array([len(q.history) for q in queries])
    out["split"] = {"items": ds.n_items, "test_users": int(len(queries)), "train_positives": len(split.train),
                    "median_history": float(np.median(lengths)) if len(lengths) else 0.0,
                    "history_cap": HISTORY_CAP}
    users = [str(ds.user_ids[u]) for u in split.test_users]
    return measure(out, methods, train, users, progress,
                   lambda m: m.recommend(queries, max(NEXT_ITEM_KS), candidates=None, exclude_history=True),
                   lambda ranked: score_next_item(ranked, split.targets))

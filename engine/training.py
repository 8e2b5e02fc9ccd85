"""`fit`: the batch training loop over logged clicks (item tower, then reranker)."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

from .index import VectorIndex
from .items import ItemTable
from .projection import Projection
from .ranking import Ranker, user_from_clicks
from .users import UserTable

log = logging.getLogger(__name__)

MIN_TRAIN_USERS = 2
CUTS = (0, 1, 2, 3, 5, 10)
MAX_RERANK_EXAMPLES = 6000
#: Share of training examples whose candidates are shown as brand-new items (no clicks, text-only
#: vectors): the reranker must also rank what has no feedback yet.
COLD_SHARE = 0.3


def click_histories(users: UserTable, items: ItemTable) -> list[np.ndarray]:
    """Per user, the live item rows clicked, de-duplicated in first-click order."""
    out = []
    for u in users.states:
        rows = np.array(list(dict.fromkeys(u.clicks)), dtype=np.int64)
        rows = rows[~items.removed[rows]] if len(rows) else rows
        if len(rows):
            out.append(rows)
    return out


def fit_towers(ranker: Ranker, items: ItemTable, users: UserTable, progress: bool) -> dict[str, Any]:
    """Train the item tower on every user's clicks; installs it in the ranker."""
    from .towers import train_towers

    cfg = ranker.config
    hist = click_histories(users, items)
    if cfg.proj_epochs == 0 or sum(len(h) >= 2 for h in hist) < MIN_TRAIN_USERS:
        return {"projection": False}
    t0 = time.perf_counter()
    w, losses = train_towers(items.vectors, hist, items.live_rows(), cfg.proj_dim, cfg.proj_epochs,
                             cfg.seed, progress=progress)
    proj = Projection(items.dim, w.weight, w.bias_weight, w.bias_const, w.tau)
    ranker.set_towers(proj, w.residual, w.item_bias)
    return {"projection": True, "projection_loss": [round(x, 4) for x in losses],
            "projection_seconds": round(time.perf_counter() - t0, 1)}


def fit_reranker(ranker: Ranker, items: ItemTable, users: UserTable, index: VectorIndex,
                 progress: bool) -> dict[str, Any]:
    """Train the reranker listwise on (history prefix -> later clicks) examples from the logs."""
    cfg = ranker.config
    if cfg.rerank_epochs == 0:
        return {"reranker": False}
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed + 1)
    examples = []
    states = [u for u in users.states if len(set(u.clicks)) >= 2]
    per_user = max(1, MAX_RERANK_EXAMPLES // max(len(states), 1))
    for u in states:
        clicks = list(dict.fromkeys(u.clicks))
        clicks = [r for r in clicks if not items.removed[r]]
        cuts = sorted({c for c in CUTS if c < len(clicks)} | {int(rng.integers(0, len(clicks)))})
        for p in rng.permutation(cuts)[:per_user]:
            ex = _example(ranker, items, index, u, clicks, int(p), as_cold=rng.random() < COLD_SHARE)
            if ex is not None:
                examples.append(ex)
    if not examples:
        return {"reranker": False}
    losses = ranker.reranker.fit(examples, cfg.rerank_epochs, progress=progress)
    return {"reranker": True, "reranker_examples": len(examples),
            "reranker_loss": [round(x, 4) for x in losses],
            "reranker_seconds": round(time.perf_counter() - t0, 1)}


def _example(ranker: Ranker, items: ItemTable, index: VectorIndex, u, clicks: list[int], p: int,
             as_cold: bool = False):
    prefix = clicks[:p]
    prof = None if u.profile_vec is None else ranker.projection.transform(u.profile_vec[None])[0]
    state = user_from_clicks(prefix, ranker.item_vectors(np.array(prefix, np.int64)), prof,
                             ranker.config.user_min_step)
    state.profile, state.profile_vec = u.profile, u.profile_vec
    cand = ranker.candidates(state, index, np.array(prefix, np.int64))
    future = np.array(clicks[p:], np.int64)
    labels = np.flatnonzero(np.isin(cand, future))
    if len(labels) == 0 or len(labels) == len(cand):
        return None
    own = np.isin(cand, future).astype(np.float64)  # leave this user's own clicks out of popularity
    return ranker.features(state, cand, own_clicks=own, as_cold=as_cold), labels

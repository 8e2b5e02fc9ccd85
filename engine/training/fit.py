"""`fit`: the batch training loop over logged clicks (item tower, then reranker)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import Config
from ..serving.index import VectorIndex
from ..state.items import ItemTable
from ..models.projection import Projection
from ..serving.ranking import Ranker, user_from_clicks
from ..storage.records import EventRecord
from ..state.users import UserState, UserTable

if TYPE_CHECKING:
    from ..state.apply import State

log = logging.getLogger(__name__)

MIN_TRAIN_USERS = 2
CUTS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 13)
MAX_RERANK_EXAMPLES = 6000
#: Share of training examples whose candidates are shown as brand-new items (no clicks, text-only
#: vectors): the reranker must also rank what has no feedback yet.
COLD_SHARE = 0.3
#: Long prefixes drawn per user besides CUTS (see history_cuts).
LONG_CUTS = 8
#: Share of users whose clicks train the reranker and not the item tower (see holdout_users).
HOLDOUT_SHARE = 0.2
MIN_HOLDOUT_USERS = 20
#: Random catalog items added to each example's candidates (see _example).
RANDOM_NEGATIVES = 64


@contextlib.contextmanager
def fit_threads(n: int) -> Iterator[None]:
    """Run the block with torch and numpy's BLAS on `n` threads (`Config.fit_threads`; 0: as
    they are); the previous counts come back after. The counts are process-wide: requests
    served meanwhile (they score in numpy, small products) compute on the same counts.

    One thread is the default: a fit's steps are a few hundred matrix products of ~10^8
    multiply-adds and many small ops, where a second thread mostly waits, the more so on a busy
    host (a fit of the bundled ratings: 54-58 CPU s on one thread, 99-204 on two; 55-60 s wall
    against 67-160 at load 2-4, benchmarks/fit.py). And one thread is reproducible: two 2-thread
    fits of the same seed differed by up to 0.05 in the reranker's weights, two 1-thread fits
    not in a bit.
    """
    if n <= 0:
        yield
        return
    import torch

    from ..threads import numpy_blas

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with numpy_blas().limit(limits=n):
            yield
    finally:
        torch.set_num_threads(before)


def fit_state(state: "State", events: Sequence[EventRecord], progress: bool) -> dict[str, Any]:
    """`Engine.fit`: train the item tower, then the reranker, on the histories in `events`.

    The users of `events` (live items only, in event order) are the training users; a share of
    them is held out of the tower for the reranker (`holdout_users`). The stored users are not
    changed except that, when the tower is retrained, every stored vector is re-derived in the
    new space. The reranker starts afresh each time, so fitting the same events twice leaves the
    same state as fitting once. Torch and BLAS compute on `Config.fit_threads` threads.
    """
    with fit_threads(state.config.fit_threads):
        return _fit_state(state, events, progress)


def _fit_state(state: "State", events: Sequence[EventRecord], progress: bool) -> dict[str, Any]:
    train = training_users(state, events)
    holdout = holdout_users(train, state.config)
    summary = {"events": sum(state.items.live_row(ev.item_id) is not None for ev in events),
               "reranker_users": len(holdout),
               **fit_towers(state.ranker, state.items, train, progress, holdout)}
    if summary["projection"]:
        state.proj = state.ranker.projection
        state.ranker.refresh_item_vectors(state.items, state.proj)
        state.users.dim = state.proj.d_out
        state.rebuild_index()
        for user in state.users.states:
            state.rederive(user)
    # the reranker learns on users whose clicks are in no co-click count it sees, as a new
    # user's are not; the counts of every user come back for serving
    held_ids = {train.vocab.id(int(i)) for i in holdout}
    skip = np.array([r for r, uid in enumerate(state.users.vocab.ids()) if uid in held_ids], np.int64)
    state.ranker.rebuild_coclicks(state.users, skip=skip)
    state.ranker.reset_reranker()
    summary.update(fit_reranker(state.ranker, state.items, train, state.index, progress, holdout))
    state.ranker.rebuild_coclicks(state.users)
    state.ranker.prepare()
    return summary


def training_users(state: "State", events: Sequence[EventRecord]) -> UserTable:
    """The users of `events` as histories (clicks and skips on live items, in order), with the
    profiles their stored namesakes have; vectors are not built (training does not read them)."""
    users = UserTable(state.proj.d_out)
    for ev in events:
        row = state.items.live_row(ev.item_id)
        if row is None:
            continue
        user = users.get_or_create(ev.user_id)
        if ev.event != "impression":
            (user.clicks if ev.event == "click" else user.skips).append(row)
    for uid, user in zip(users.vocab.ids(), users.states):
        stored = state.users.get(uid)
        if stored is not None:
            user.profile, user.profile_vec = stored.profile, stored.profile_vec
    return users


def click_histories(states: Sequence[UserState], items: ItemTable) -> list[np.ndarray]:
    """Per user, the live item rows clicked, de-duplicated in first-click order."""
    out = []
    for u in states:
        rows = np.array(list(dict.fromkeys(u.clicks)), dtype=np.int64)
        rows = rows[~items.removed[rows]] if len(rows) else rows
        if len(rows):
            out.append(rows)
    return out


def holdout_users(users: UserTable, config: Config) -> np.ndarray:
    """Positions (in users.states) of the users kept out of the item tower for the reranker.

    The reranker must learn how far to trust the tower on users the tower has not seen, which is
    what every new user is: trained on the tower's own training users, it would learn a tower that
    knows their future (its item residuals were fit on it) and over-trust it. With fewer than
    MIN_HOLDOUT_USERS eligible users, or no reranker to train, everyone trains the tower.
    """
    if config.rerank_epochs == 0 or config.proj_epochs == 0:
        return np.zeros(0, np.int64)
    eligible = np.array([i for i, u in enumerate(users.states) if len(set(u.clicks)) >= 2], np.int64)
    n = int(round(HOLDOUT_SHARE * len(eligible)))
    if n < MIN_HOLDOUT_USERS:
        return np.zeros(0, np.int64)
    return np.sort(np.random.default_rng(config.seed + 2).permutation(eligible)[:n])


def fit_towers(ranker: Ranker, items: ItemTable, users: UserTable, progress: bool,
               holdout: np.ndarray | None = None) -> dict[str, Any]:
    """Train the item tower on the clicks of every user not in `holdout`; installs it in the ranker."""
    from .towers import train_towers

    cfg = ranker.config
    skip = set() if holdout is None else set(holdout.tolist())
    hist = click_histories([u for i, u in enumerate(users.states) if i not in skip], items)
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
                 progress: bool, holdout: np.ndarray | None = None) -> dict[str, Any]:
    """Train the reranker listwise on (history prefix -> later clicks) examples of the `holdout`
    users (all users when it is empty or None)."""
    cfg = ranker.config
    if cfg.rerank_epochs == 0:
        return {"reranker": False}
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed + 1)
    examples, groups = [], []
    pool = users.states if holdout is None or not len(holdout) else [users.states[i] for i in holdout]
    states = [u for u in pool if len(set(u.clicks)) >= 2]
    per_user = max(1, MAX_RERANK_EXAMPLES // max(len(states), 1))
    for g, u in enumerate(states):
        clicks = list(dict.fromkeys(u.clicks))
        clicks = [r for r in clicks if not items.removed[r]]
        for p in rng.permutation(history_cuts(len(clicks), rng))[:per_user]:
            ex = _example(ranker, items, index, u, clicks, int(p), rng, as_cold=rng.random() < COLD_SHARE)
            if ex is not None:
                examples.append(ex)
                groups.append(g)
    if not examples:
        return {"reranker": False}
    losses = ranker.reranker.fit(examples, cfg.rerank_epochs, progress=progress, groups=np.array(groups))
    return {"reranker": True, "reranker_examples": len(examples),
            "reranker_loss": [round(x, 4) for x in losses],
            "reranker_valid_recall": (None if ranker.reranker.valid_recall is None
                                      else round(ranker.reranker.valid_recall, 4)),
            "reranker_seconds": round(time.perf_counter() - t0, 1)}


def history_cuts(n: int, rng: np.random.Generator) -> list[int]:
    """Prefix lengths to train on for a user with n clicks: the short ones (CUTS) where cold-start
    lives, plus LONG_CUTS drawn log-uniformly over [1, n) so that long histories, which serving
    meets too, are inside the range the network was trained on."""
    cuts = {c for c in CUTS if c < n}
    if n > 2:
        cuts |= {int(c) for c in np.exp(rng.uniform(0.0, np.log(n - 1), LONG_CUTS))}
    return sorted(cuts)


def _example(ranker: Ranker, items: ItemTable, index: VectorIndex, u, clicks: list[int], p: int,
             rng: np.random.Generator, as_cold: bool = False):
    prefix = clicks[:p]
    prof = None if u.profile_vec is None else ranker.projection.transform(u.profile_vec[None])[0]
    state = user_from_clicks(prefix, ranker.item_vectors(np.array(prefix, np.int64)), prof,
                             ranker.config.user_min_step)
    state.profile, state.profile_vec = u.profile, u.profile_vec
    cand = ranker.candidates(state, index, np.array(prefix, np.int64), refresh=True)
    if RANDOM_NEGATIVES:
        # a few items from anywhere in the catalog: an application may hand `recommend` any
        # candidates, and the network must not extrapolate where retrieval never led it
        live = items.live_rows()
        extra = live[rng.integers(0, len(live), RANDOM_NEGATIVES)]
        cand = np.union1d(cand, extra[~np.isin(extra, prefix)])
    future = np.array(clicks[p:], np.int64)
    labels = np.flatnonzero(np.isin(cand, future))
    if len(labels) == 0 or len(labels) == len(cand):
        return None
    own = np.isin(cand, future).astype(np.float64)  # this user's own clicks leave popularity
    return ranker.features(state, cand, as_cold=as_cold, own_clicks=own), labels

"""`fit`: the batch training loop over logged clicks (item tower, then reranker)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..runtime.core import Core
from ..runtime.state import State
from ..errors import InvalidInputError
from ..serving.index import VectorIndex
from ..state.items import ItemTable
from ..models.projection import Projection
from ..models.rerank import SIGNALS
from ..serving.ranking import DEFAULT_PROFILE_WEIGHT, Ranker, user_from_clicks
from ..storage.records import EventRecord
from ..state.users import UserState, UserTable
from ..text.catalog import item_text
from ..text.embedding import embed, embed_many
from ..text.encoder import TextEncoder, default_model_path


log = logging.getLogger(__name__)

MIN_TRAIN_USERS = 2
CUTS = (0, 1, 2, 3, 4, 5, 6, 8, 10, 13)
MAX_RERANK_EXAMPLES = 30000
#: Share of training examples whose candidates are shown as brand-new items (no clicks, text-only
#: vectors): the reranker must also rank what has no feedback yet.
COLD_SHARE = 0.3
#: Long prefixes drawn per user besides CUTS (see history_cuts).
LONG_CUTS = 8
#: Windows drawn per short length (CUTS) and user besides the prefix (see user_windows).
WINDOWS = 3
#: Folds of the reranker's training users: each fold's lists come from a tower fit on the others
#: (see reranker_folds); a fold needs MIN_HOLDOUT_USERS users.
RERANK_FOLDS = 2
MIN_HOLDOUT_USERS = 20
#: Random catalog items added to each example's candidates (see _example).
RANDOM_NEGATIVES = 64
#: The profile's weight in the user vector (clicks' worth) is chosen among PROFILE_WEIGHTS by the
#: retrieval recall it gives a fold's profile users after PROFILE_CUTS clicks (`profile_weights`),
#: on at most PROFILE_USERS users a fold; with fewer than MIN_PROFILE_PAIRS (user, cut) pairs in
#: all, it stays `ranking.DEFAULT_PROFILE_WEIGHT`.
PROFILE_WEIGHTS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
PROFILE_CUTS = (1, 3, 5)
PROFILE_USERS = 300
MIN_PROFILE_PAIRS = 100


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


@dataclass
class TuneRequest:
    """What `fit` needs to tune the language model first (Config.tune_steps > 0): the model folder
    to start from, the folder to save the tuned one to, and how the engine makes an encoder of a
    folder. `encoder` is set to the tuned model's encoder when the model was tuned."""

    base_model: str
    out_dir: Path
    make_encoder: Callable[[str], TextEncoder]
    encoder: TextEncoder | None = None


def fit_store(core: Core, recs: list[EventRecord], progress: bool) -> dict[str, Any]:
    """`Engine.fit` on an open store (the caller holds its write lock): the waiting online steps
    first, then `fit_state` (tuning the language model first when `Config.tune_steps` > 0, into
    the folder of the generation it saves), then a save. A failed tuned fit leaves the store and
    the engine as they were."""
    core.steps.drain()  # the clicks before the fit step the model they were made on
    if not core.config.tune_steps:
        summary = fit_state(core.state, recs, progress)
        core.commit()  # (its save gives the training's temporaries back)
        return summary
    if not core.encoders.tunable():
        raise InvalidInputError("tune_steps > 0 tunes a sentence-transformers model; this engine was "
                                "given another encoder (open it without one, or set tune_steps=0)")
    out = core.store.encoder_dir(core.generation + 1)
    request = TuneRequest(core.config.model_path or default_model_path(), out, core.encoders.make)
    try:
        summary = fit_state(core.state, recs, progress, request)
    except BaseException:
        core.restore()  # the catalog may have been re-embedded half-way
        core.store.cleanup(core.manifest)
        raise
    if request.encoder is not None:
        core.encoders.adopt_tuned(out, request.encoder)
    core.commit()
    return summary


def fit_state(state: State, events: Sequence[EventRecord], progress: bool,
              tune: TuneRequest | None = None) -> dict[str, Any]:
    """`Engine.fit`: train the item tower, then the reranker, on the histories in `events`.

    The users of `events` (live items only, in event order) are the training users. The reranker
    trains on lists of every one of them with two clicks or more, each fold's lists ranked by a
    tower fit on the other folds (`reranker_folds`); the tower that serves is then fit on all
    of them. The stored users are not changed except that, when the tower is retrained, every
    stored vector is re-derived in the new space. The reranker starts afresh each time, so fitting the same events twice leaves the
    same state as fitting once. Torch and BLAS compute on `Config.fit_threads` threads.
    """
    tuned: dict[str, Any] = {}
    if tune is not None:
        threads = state.config.tune_threads or os.cpu_count() or 1
        with fit_threads(threads):
            tuned = tune_state(state, training_users(state, events), tune, progress)
    with fit_threads(state.config.fit_threads):
        return {**tuned, **_fit_state(state, events, progress)}


def tune_state(state: State, train: UserTable, tune: TuneRequest, progress: bool) -> dict[str, Any]:
    """Tune the language model on the co-clicks of the training users `train` (their click
    histories, and nothing else), then embed every item and stored profile again with it and
    serve from the new vectors (the index rebuilt, the users re-derived). With too few pairs
    nothing changes."""
    from .encoder_tuning import MIN_PAIRS, co_click_pairs, tune_encoder

    pairs = co_click_pairs(click_histories(train.states, state.items))
    if len(pairs) < MIN_PAIRS:
        log.warning("the language model is not tuned: %d co-click pairs, fewer than %d", len(pairs), MIN_PAIRS)
        return {"encoder_tuned": False, "encoder_pairs": int(len(pairs))}
    items = state.items
    summary = tune_encoder(tune.base_model, lambda r: item_text(items.item(r)), pairs,
                           state.config.tune_steps, state.config.seed, tune.out_dir, progress)
    t0 = time.perf_counter()
    encoder = tune.make_encoder(str(tune.out_dir))
    vectors = embed_many(encoder, [item_text(items.item(r)) for r in range(len(items))], items.dim, progress)
    profiled = [u for u in state.users.states if u.profile and u.profile_vec is not None]
    profiles = embed(encoder, [u.profile for u in profiled], items.dim) if profiled else None
    items.install_vectors(vectors)
    for i, user in enumerate(profiled):
        user.profile_vec = profiles[i]
    state.refresh_space()
    state.rebuild_index()
    for user in state.users.states:
        state.rederive(user)
    tune.encoder = encoder
    summary["encoder_embed_seconds"] = round(time.perf_counter() - t0, 1)
    return summary


def _fit_state(state: State, events: Sequence[EventRecord], progress: bool) -> dict[str, Any]:
    train = training_users(state, events)
    folds = reranker_folds(train, state.config)
    summary: dict[str, Any] = {"events": sum(state.items.live_row(ev.item_id) is not None for ev in events),
                               "reranker_users": int(sum(len(f) for f in folds)), "reranker_folds": len(folds),
                               "profile_users": sum(u.profile_vec is not None for u in train.states)}
    rng = np.random.default_rng(state.config.seed + 1)
    t0 = time.perf_counter()
    made: tuple[list, list[int], list[int]] = ([], [], [])
    weighed = np.zeros(len(PROFILE_WEIGHTS)), 0
    for held in folds:
        # cross-fitting: the lists of a fold's users are ranked by a tower that never saw them,
        # with co-clicks counted without them, as a new user's are
        if fit_towers(state.ranker, state.items, train, progress, held)["projection"]:
            _adopt_space(state)
        state.rebuild_coclicks(skip=_stored_rows(state, train, held))
        fold = profile_weights(state.ranker, state.items, train, held)
        state.ranker.profile_weight = chosen_weight(*fold)
        weighed = weighed[0] + fold[0], weighed[1] + fold[1]
        _extend(made, reranker_lists(state.ranker, state.items, train, state.index, held, rng))
    state.ranker.profile_weight = chosen_weight(*weighed)
    summary.update({"profile_weight": state.ranker.profile_weight, "profile_weight_users": weighed[1],
                    "profile_weight_recalls": ({str(w): round(float(r / weighed[1]), 4)
                                                for w, r in zip(PROFILE_WEIGHTS, weighed[0])}
                                               if weighed[1] else {})})
    summary.update(fit_towers(state.ranker, state.items, train, progress))
    if summary["projection"]:
        _adopt_space(state)
        for user in state.users.states:
            state.rederive(user)
    state.rebuild_coclicks()
    if not folds and state.config.rerank_epochs:  # too few users to hold any out: train on all
        _extend(made, reranker_lists(state.ranker, state.items, train, state.index, None, rng))
    state.ranker.reset_reranker()
    examples, groups, totals = made
    summary.update(fit_reranker(state.ranker, examples, np.array(groups, np.int64), progress, t0,
                                np.array(totals, np.int64)))
    live = state.items.live_rows()
    state.ranker.reranker.catalog_rows = len(state.items)
    state.ranker.reranker.catalog_until = int(state.items.added_at[live].max()) if len(live) else -1
    state.ranker.prepare()
    return summary


def _adopt_space(state: State) -> None:
    """Serve from the tower the ranker now holds: item vectors, the index, the users' width."""
    state.proj = state.ranker.space.projection
    state.refresh_space()
    state.users.dim = state.proj.d_out
    state.rebuild_index()


def _stored_rows(state: State, train: UserTable, positions: np.ndarray) -> np.ndarray:
    """Rows in the stored user table of the training users at `positions`."""
    ids = {train.vocab.id(int(i)) for i in positions}
    return np.array([r for r, uid in enumerate(state.users.vocab.ids()) if uid in ids], np.int64)


def _extend(into: tuple[list, list[int], list[int]], made: tuple[list, list[int], list[int]]) -> None:
    for whole, part in zip(into, made):
        whole.extend(part)


def training_users(state: State, events: Sequence[EventRecord]) -> UserTable:
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


def reranker_folds(users: UserTable, config: Config) -> list[np.ndarray]:
    """Positions (in users.states) of the reranker's training users, in RERANK_FOLDS folds.

    The reranker must learn how far to trust the tower on users the tower has not seen, which is
    what every new user is: trained on the tower's own training users, it would learn a tower
    that knows their future (its item residuals were fit on it) and over-trust it. So each fold's
    lists are made with a tower fit on the other folds (cross-fitting), and every user with two
    clicks or more makes lists. With fewer than MIN_HOLDOUT_USERS such users in a fold, or no
    reranker to train, there are no folds.
    """
    if config.rerank_epochs == 0:
        return []
    eligible = np.array([i for i, u in enumerate(users.states) if len(set(u.clicks)) >= 2], np.int64)
    if len(eligible) < RERANK_FOLDS * MIN_HOLDOUT_USERS:
        return []
    order = np.random.default_rng(config.seed + 2).permutation(eligible)
    return [np.sort(part) for part in np.array_split(order, RERANK_FOLDS)]


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
    ranker.space.set_towers(proj, w.residual, w.item_bias)
    return {"projection": True, "projection_loss": [round(x, 4) for x in losses],
            "projection_seconds": round(time.perf_counter() - t0, 1)}


def reranker_lists(ranker: Ranker, items: ItemTable, users: UserTable, index: VectorIndex,
                   positions: np.ndarray | None, rng: np.random.Generator
                   ) -> tuple[list, list[int], list[int]]:
    """Training lists (history window -> the user's other clicks, `user_windows`) of the users at
    `positions` (None: all), ranked by the ranker as it stands; with each list's user position
    and its number of targets (the user's other clicks, in the candidates or not)."""
    examples: list = []
    groups: list[int] = []
    totals: list[int] = []
    picked = range(len(users.states)) if positions is None else positions.tolist()
    pool = [(int(g), users.states[int(g)]) for g in picked if len(set(users.states[int(g)].clicks)) >= 2]
    per_user = max(1, MAX_RERANK_EXAMPLES // max(len(pool), 1)) if positions is None else \
        max(1, MAX_RERANK_EXAMPLES // max(RERANK_FOLDS * len(pool), 1))
    for g, u in pool:
        clicks = [r for r in dict.fromkeys(u.clicks) if not items.removed[r]]
        for start, p in user_windows(len(clicks), per_user, rng):
            ex = _example(ranker, items, index, u, clicks, start, p, rng, as_cold=rng.random() < COLD_SHARE)
            if ex is not None:
                examples.append(ex)
                groups.append(g)
                totals.append(len(clicks) - p)
    return examples, groups, totals


def fit_reranker(ranker: Ranker, examples: list, groups: np.ndarray, progress: bool,
                 t0: float, totals: np.ndarray | None = None) -> dict[str, Any]:
    """Train the reranker listwise on `examples` (early stopping on held-out users' `groups`;
    `totals`, each list's number of targets, see rerank_train.fit)."""
    cfg = ranker.config
    if cfg.rerank_epochs == 0 or not examples:
        return {"reranker": False}
    t1 = time.perf_counter()
    from .reranker import fit

    losses = fit(ranker.reranker, examples, cfg.rerank_epochs, progress=progress, groups=groups, totals=totals,
                 residual=cfg.rerank_mlp)
    return {"reranker": True, "reranker_examples": len(examples),
            "reranker_loss": [round(x, 4) for x in losses],
            "reranker_valid_recall": (None if ranker.reranker.valid_recall is None
                                      else round(ranker.reranker.valid_recall, 4)),
            "reranker_warm_start": [None if j < 0 else SIGNALS[j][0] for j in ranker.reranker.warm_start],
            "reranker_buckets": ranker.reranker.gate_report,
            "reranker_mlp": ranker.reranker.residual_report,
            "reranker_mlp_gate": [int(g) for g in ranker.reranker.weights["mlp_gate"]],
            "reranker_expert": [None if j < 0 else SIGNALS[j][0] for j in ranker.reranker.expert.tolist()],
            "reranker_lists_seconds": round(t1 - t0, 1),
            "reranker_seconds": round(time.perf_counter() - t0, 1)}


def profile_weights(ranker: Ranker, items: ItemTable, users: UserTable,
                    positions: np.ndarray) -> tuple[np.ndarray, int]:
    """How well each of PROFILE_WEIGHTS lets a user vector retrieve what the user clicks next:
    for the profile users at `positions` (the first PROFILE_USERS), after each of PROFILE_CUTS
    first clicks, the recall@`retrieve` of the other clicks among all live items under the user's
    query (what the index search ranks by), summed per weight; with the number of (user, cut)
    pairs. The ranker's tower must not have seen these users (a fold's, in cross-fitting)."""
    totals = np.zeros(len(PROFILE_WEIGHTS))
    n = 0
    live = items.live_rows()
    picked = [users.states[int(g)] for g in positions.tolist() if users.states[int(g)].profile_vec is not None]
    if not ranker.trained or not len(live) or not picked:
        return totals, n
    keys = ranker.space.index_vectors(live)  # what the index holds: [tau * v, bias]
    depth = min(ranker.config.retrieve, len(live))
    for u in picked[:PROFILE_USERS]:
        clicks = [r for r in dict.fromkeys(u.clicks) if not items.removed[r]]
        prof = ranker.space.projection.transform(u.profile_vec[None])[0]
        for p in PROFILE_CUTS:
            if len(clicks) - p < 1 or len(live) - p <= depth:
                continue
            prefix, future = clicks[:p], np.array(clicks[p:], np.int64)
            vecs = ranker.space.item_vectors(np.array(prefix, np.int64))
            queries = np.stack([ranker.space.query(user_from_clicks(prefix, vecs, prof, ranker.config.user_min_step, w,
                                                              u.profile, u.profile_vec).vector, p + w)
                                for w in PROFILE_WEIGHTS])
            scores = queries @ keys.T
            scores[:, np.isin(live, prefix)] = -np.inf
            top = np.argpartition(-scores, depth - 1, axis=1)[:, :depth]
            totals += np.isin(live[top], future).sum(axis=1) / min(depth, len(future))
            n += 1
    return totals, n


def chosen_weight(totals: np.ndarray, n: int) -> float:
    """The weight of PROFILE_WEIGHTS with the best summed recall over `n` (user, cut) pairs, or the
    default where too few were seen to tell."""
    if n < MIN_PROFILE_PAIRS:
        return DEFAULT_PROFILE_WEIGHT
    return float(PROFILE_WEIGHTS[int(np.argmax(totals))])


def history_cuts(n: int, rng: np.random.Generator) -> list[int]:
    """Prefix lengths to train on for a user with n clicks: the short ones (CUTS) where cold-start
    lives, plus LONG_CUTS drawn log-uniformly over [1, n) so that long histories, which serving
    meets too, are inside the range the network was trained on."""
    cuts = {c for c in CUTS if c < n}
    if n > 2:
        cuts |= {int(c) for c in np.exp(rng.uniform(0.0, np.log(n - 1), LONG_CUTS))}
    return sorted(cuts)


def user_windows(n: int, most: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(start, length) of the clicks a user's training lists show as the history, at most `most`:
    every prefix of `history_cuts` first, then windows of the short lengths (CUTS) started
    further in (WINDOW_SHARE of the rest), so that the short histories where cold start lives
    get many lists, not one per user. A window's targets are all of the user's other clicks,
    as a new user's are all their clicks after the ones revealed."""
    prefixes = [(0, int(p)) for p in rng.permutation(history_cuts(n, rng))]
    if len(prefixes) >= most:
        return prefixes[:most]
    extra = []
    for p in CUTS[1:]:
        if n - p >= 2:
            for s in rng.choice(np.arange(1, n - p + 1), size=min(WINDOWS, n - p), replace=False):
                extra.append((int(s), p))
    extra = [extra[i] for i in rng.permutation(len(extra))]
    return prefixes + extra[: most - len(prefixes)]


def _example(ranker: Ranker, items: ItemTable, index: VectorIndex, u, clicks: list[int], start: int, p: int,
             rng: np.random.Generator, as_cold: bool = False):
    prefix = clicks[start:start + p]
    prof = None if u.profile_vec is None else ranker.space.projection.transform(u.profile_vec[None])[0]
    state = user_from_clicks(prefix, ranker.space.item_vectors(np.array(prefix, np.int64)), prof,
                             ranker.config.user_min_step, ranker.profile_weight, u.profile, u.profile_vec)
    state.profile, state.profile_vec = u.profile, u.profile_vec
    cand = ranker.candidates(state, index, np.array(prefix, np.int64), refresh=True)
    if RANDOM_NEGATIVES:
        # a few items from anywhere in the catalog: an application may hand `recommend` any
        # candidates, and the network must not extrapolate where retrieval never led it
        live = items.live_rows()
        extra = live[rng.integers(0, len(live), RANDOM_NEGATIVES)]
        cand = np.union1d(cand, extra[~np.isin(extra, prefix)])
    future = np.array(clicks[:start] + clicks[start + p:], np.int64)
    labels = np.flatnonzero(np.isin(cand, future))
    if len(labels) == 0 or len(labels) == len(cand):
        return None
    own = np.isin(cand, future).astype(np.float64)  # this user's own clicks leave popularity
    return ranker.expanded_features(state, cand, as_cold=as_cold, own_clicks=own), labels

"""Candidates, features, scores and online learning: everything between a user state and a list.

The Ranker owns the retrieval space (item vectors and biases from the item tower), the popularity
prior, the reranker and exploration. Candidates are the ANN neighbours of the user's query plus the
most-clicked items; the reranker scores them; exploration adds a bounded bonus to items with little
feedback. Until anything is trained the score is a fixed blend of similarity and popularity whose
popularity weight fades as the user's history grows.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from ..text.catalog import item_text
from ..state.coclick import CoClicks
from ..config import Config
from .diversity import mmr
from .backend import VectorBackend
from .index import VectorIndex
from ..state.items import ItemTable
from ..state.lexical import Lexicon
from ..models.projection import Projection
from ..models.rerank import FEATURES, N_FEATURES, Reranker, expand
from ..state.users import UserState, UserTable, apply_click, apply_dislike, apply_skip
from ..vectors import grown, normalise, outside, sorted_unique

#: The popular list holds at least this many rows (4x what its first request needs, when more),
#: so that requests with longer exclusions rarely need a rebuild.
POP_MIN_CACHE = 256
#: Weight of the learned popularity bias against log clicks where both rank (a tie-breaker).
POP_TIEBREAK = 1e-3
#: The online step learns the click among the user's best this many candidates (bounds its cost).
ONLINE_CANDIDATES = 100
#: The standard deviation of the uniform Beta(1, 1) CTR prior: exploration draws are measured in it.
PRIOR_SD = float(np.sqrt(1.0 / 12.0))
#: Exploration draws are clipped at this many prior deviations: the bonus stays bounded.
EXPLORE_CLIP = 2.0
#: Strength of a new item's Beta prior from its match with the user (see Ranker.with_new_items).
NEW_ITEM_PRIOR = 8.0
#: The most recently added rows `with_new_items` considers beside the candidates.
NEW_ITEM_POOL = 2048
#: The lexical profile is the mean TF-IDF vector of this many of the user's latest clicks.
LEXICAL_HISTORY = 50
#: Weight of a recent click in the co-click features, per click since: the item clicked last says
#: most about what comes next (1.0 weighs the last `recent_window` clicks alike). On the next-item
#: validation split of amazon-office, 1.0 / 0.5 / 0.25 gave NDCG@10 0.117 / 0.125 / 0.122.
RECENCY_DECAY = 0.5
_COL = {name: i for i, name in enumerate(FEATURES)}


#: The profile's weight in a user's vector, in clicks, where `fit` found no profile to learn it
#: from (and in stores written before it was learned), and the tensor it is saved as.
DEFAULT_PROFILE_WEIGHT = 1.0
PROFILE_WEIGHT_TENSOR = "users.profile_weight"


def profile_weight_from(tensors: dict[str, np.ndarray]) -> float:
    """The saved profile weight (DEFAULT_PROFILE_WEIGHT when the store has none); a value that is
    not one positive finite number is refused."""
    if PROFILE_WEIGHT_TENSOR not in tensors:
        return DEFAULT_PROFILE_WEIGHT
    t = np.asarray(tensors[PROFILE_WEIGHT_TENSOR], np.float64)
    if t.shape != (1,) or not np.isfinite(t[0]) or t[0] <= 0:
        raise ValueError(f"{PROFILE_WEIGHT_TENSOR} must hold one positive finite number; got {t.tolist()!r}")
    return float(t[0])


class NeedsWrite(Exception):
    """A request found a cache to rebuild; it runs again holding the write lock."""


class Ranker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.projection: Projection | None = None
        self._items: ItemTable | None = None
        self._vecs: np.ndarray | None = None      # retrieval vectors when trained (else the raw ones)
        self._bias = np.zeros(0, np.float32)
        self._warm: WarmResiduals | None = None  # the towers' learned residuals of warm items
        self._pop_cache: np.ndarray | None = None
        #: The store's index (set by State): untrained, the vectors it holds are the raw ones
        self.index: VectorBackend | None = None
        self.coclicks = CoClicks()
        self.lexicon = Lexicon()
        #: How many clicks a user's profile weighs in the user's vector (`UserState.prior`):
        #: learned by `fit` from the training users' profiles (training/fit.py, profile_weight);
        #: one click where no training user had one.
        self.profile_weight = DEFAULT_PROFILE_WEIGHT
        self.reset_reranker()

    # ---- retrieval space ---------------------------------------------------------------------
    @property
    def trained(self) -> bool:
        return self.projection is not None and self.projection.trained

    @property
    def index_dim(self) -> int:
        return self.projection.d_out + 1

    def _rows_capacity(self, n: int) -> None:
        for name in ("_vecs", "_bias"):
            arr = getattr(self, name)
            if arr is not None:
                setattr(self, name, grown(arr, n))

    def refresh_item_vectors(self, items: ItemTable, proj: Projection) -> None:
        """Recompute every item's retrieval vector and bias (after open or training)."""
        self._items, self.projection = items, proj
        n = len(items)
        self._rows_capacity(n)
        if len(self.lexicon) != n:
            self.lexicon.rebuild((item_text(items.item(r)) for r in range(n)), items.removed)
        if proj.trained:
            warm = self._warm.below(n) if self._warm is not None else WarmResiduals.empty(proj.d_out)
            self._vecs = proj.transform(items.vectors, warm.residual, warm.rows)
            self._bias = proj.bias(items.vectors, warm.bias, warm.rows)
            items.release_vector_pages()  # one pass over every row: the file need not stay resident
        else:
            self._vecs, self._bias = None, np.zeros(n, np.float32)
        self._pop_cache = None

    def on_items_added(self, items: ItemTable, proj: Projection, rows: np.ndarray) -> None:
        self._items, self.projection = items, proj
        self._rows_capacity(len(items))
        if self._warm is not None:  # a new (or replaced) item has no audience yet
            self._warm = self._warm.without(rows)
        if self._vecs is not None:
            self._vecs[rows] = proj.transform(items.vector_rows(rows))
        self._bias[rows] = proj.bias(items.vector_rows(rows))
        for r in rows:
            self.lexicon.set(int(r), item_text(items.item(int(r))))
        self._pop_cache = None

    def on_items_removed(self, rows: np.ndarray) -> None:
        for r in rows:
            self.lexicon.clear(int(r))
        self._pop_cache = None

    def reset_reranker(self) -> None:
        """A fresh, untrained reranker with the configured seed (what `fit` trains from)."""
        c = self.config
        self.reranker = Reranker(c.rerank_hidden, c.online_lr, c.replay_size, c.replay_batch, c.seed, c.online_pull)

    def prepare(self) -> None:
        """Draw the reranker's initial weights now (a writer) if serving will score with them,
        so that no request has to: only a trained tower without a trained reranker needs it."""
        if self.trained and not self.reranker.trained:
            self.reranker.weights  # noqa: B018 - drawn and kept

    def invalidate_popular(self) -> None:
        self._pop_cache = None

    def item_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Unit retrieval vectors of `rows`: shape (len(rows), d_out), float32.

        Untrained, these are the raw text vectors, and the index holds them bit for bit ([v, 0]:
        tau is 1): they are read from the index's own storage when it keeps floats (flat, hnsw),
        so serving never touches the mapped vectors file and the index is the one copy in memory.
        Otherwise, and for rows the index does not hold, from the item table (`_own_vectors`)."""
        rows = np.asarray(rows, dtype=np.int64)
        held = self.index.stored(rows, self._items.dim) if self._index_holds_raw() else None
        return held if held is not None else self._own_vectors(rows)

    def scoring_vectors(self, rows: np.ndarray) -> np.ndarray:
        """`item_vectors` for scoring a request's candidates: on a compressed index (hnsw-sq8),
        untrained, the vectors its codes stand for, decoded from the index (what its search
        scored; cosine ~0.9999 to the raw ones), so serving keeps no float copy resident: reading
        the raw rows pulled the mapped vectors file into the process (0.92x the raw vectors at
        1M after 1,000 requests). State changes (a click's step, a user rebuilt from history)
        keep the exact vectors of `item_vectors`."""
        codes = (self.index.decoded(np.asarray(rows, dtype=np.int64), self._items.dim)
                 if self._index_holds_raw() else None)
        return codes if codes is not None else self.item_vectors(rows)

    def _index_holds_raw(self) -> bool:
        """Untrained, the index holds each item's raw text vector as [v, 0] (see item_vectors)."""
        return self._vecs is None and self.index is not None and self.index.dim == self._items.dim + 1

    def _own_vectors(self, rows: np.ndarray) -> np.ndarray:
        """`item_vectors` from the source of truth: the item table (untrained, mapped; see
        ItemTable) or the tower's vectors, never the index (which a rebuild is replacing)."""
        if self._vecs is None:
            return self._items.vector_rows(rows)
        return np.ascontiguousarray(self._vecs[rows])

    def index_vectors(self, rows: np.ndarray) -> np.ndarray:
        """What FAISS stores: [tau * v, b], so <[u, 1], .> = tau <u, v> + b (the tower score)."""
        tau = self.projection.tau
        rows = np.asarray(rows, dtype=np.int64)
        return np.ascontiguousarray(np.hstack([tau * self._own_vectors(rows), self._bias[rows, None]]),
                                    dtype=np.float32)

    def query(self, u: np.ndarray, n: int = 0) -> np.ndarray:
        """[u * tau(n) / tau_ref, 1]: the index holds tau_ref * v, the user's history sets tau(n)."""
        scale = self.projection.tau_for(n) / self.projection.tau
        return np.append(scale * u, np.float32(1.0)).astype(np.float32)

    def similar_query(self, row: int) -> np.ndarray:
        return np.append(self.item_vectors(np.array([row]))[0], np.float32(0.0)).astype(np.float32)

    # ---- online learning ---------------------------------------------------------------------
    def on_event(self, user: UserState, row: int, kind: str, items: ItemTable,
                 index: VectorIndex | None = None, t: int = 0) -> None:
        """Steps 1-4 of an event at time `t` (see state/apply.py): with `index`, a click first takes
        the reranker's online step; then co-clicks, the user's vector and the item's counts."""
        if kind == "click" and index is not None and self.learns_online():
            self._online_step(user, row, index)
        vec = self.item_vectors(np.array([row]))[0]
        if kind == "click":
            self.coclicks.add_click(user.clicks, row)
            apply_click(user, vec, self.config.user_min_step, self.profile_weight)
            items.clicks[row] += 1.0
            if self.config.popularity_half_life_s is not None:
                items.add_decayed_click(row, t, self.config.popularity_half_life_s)
            items.impressions[row] += 1.0
            self._bump_popular(row)
        elif kind == "skip":
            apply_skip(user, vec, self.config.user_min_step, self.config.skip_step, self.profile_weight)
            items.skips[row] += 1.0
            items.impressions[row] += 1.0
        elif kind == "dislike":  # a strong skip; the item's counts take it as one
            apply_dislike(user, vec, self.config.user_min_step, self.config.dislike_step, self.profile_weight)
            items.skips[row] += 1.0
            items.impressions[row] += 1.0
        else:
            items.impressions[row] += 1.0

    def _online_step(self, user: UserState, row: int, index: VectorIndex) -> None:
        """The step taken inside the event (stores whose log predates deferred steps)."""
        plan = self.step_plan(user, row, index, refresh=True, applied=False)
        if plan is not None:
            self.reranker.partial_fit(*plan)

    def learns_online(self) -> bool:
        """Does a click take a reranker step (trained, and `online_lr > 0`)?"""
        return self.reranker.trained and self.config.online_lr > 0

    def step_plan(self, user: UserState, row: int, index: VectorIndex, refresh: bool,
                  applied: bool = True) -> tuple[np.ndarray, np.ndarray] | None:
        """What the online step on a click of `row` learns from: the inputs of `user`'s best
        ONLINE_CANDIDATES candidates and the clicked one's place among them; None when the item
        is not among them (a click the reranker could not have ranked teaches it nothing about
        ranking; forcing the item in taught it that what retrieval missed gets clicked). `user`
        is the user as they stood before the click; with `applied` the click itself has been
        applied since (the deferred step): its own count and co-click pairs are taken out of the
        features (a label must not show in its inputs). A read (NeedsWrite as `popular` says)."""
        seen = user.seen()
        banned = np.fromiter(seen, np.int64, len(seen))
        cand = self.candidates(user, index, banned, refresh=refresh, before_click=row if applied else None)
        # once (the best are re-standardised among themselves), without the click's own counts
        raw = self.raw_features(user, cand, before_click=row if applied else None)
        if len(cand) > ONLINE_CANDIDATES:
            best = np.argsort(-self.score(user, cand, raw), kind="stable")[:ONLINE_CANDIDATES]
            cand, raw = cand[best], raw[best]
        label = np.flatnonzero(cand == row)
        if len(label) == 0 or len(cand) < 2:
            return None
        return expand(raw, user.count, user.profile_vec is not None), label

    # ---- candidates, features, scores --------------------------------------------------------
    def popular(self, n: int, refresh: bool = False) -> np.ndarray:
        """At least the n most-clicked live rows, best first (fewer when fewer are live).

        The list is cached and kept exact click by click (`_bump_popular`, O(list) per click);
        it is dropped when items come or go or the learned prior changes, and rebuilt (O(items))
        by the first request that finds it missing or too short. A rebuild is a write: with
        `refresh` false (the caller holds only the read lock) a request that needs one raises
        NeedsWrite, and the engine asks again under the write lock. Readers never change it.
        """
        cache = self._pop_cache
        if cache is not None and len(cache) >= n:
            return cache
        if not refresh:
            raise NeedsWrite("the popular list must be rebuilt")
        self._pop_cache = self._most_clicked(max(4 * n, POP_MIN_CACHE))
        return self._pop_cache

    def _bump_popular(self, row: int) -> None:
        """One more click on `row` (a write; only its score rose): the cached top list stays the
        exact top list. `row` moves up within it, or takes the last place's slot when it now
        ranks above that item. Decay scales every item's score alike, so it changes no order."""
        cache = self._pop_cache
        if cache is None:
            return
        if not (cache == row).any():  # (a list that holds every live row holds `row`)
            pair = np.array([cache[-1], row], np.int64)
            if self._most_clicked(1, pair)[0] != row:
                return
            cache = np.append(cache[:-1], row)
        self._pop_cache = self._most_clicked(len(cache), cache)

    def _popular_before(self, pop: np.ndarray, row: int, m: int) -> np.ndarray:
        """`pop` (the most clicked first) without `row` when, one click fewer, the row would have
        fallen behind the m-th of the others (ties keep it)."""
        at = np.flatnonzero(pop == row)
        if not len(at):
            return pop
        others = np.delete(pop, at)
        if len(others) < m:
            return pop
        before = self.popularity(np.array([row]))[0] - 1.0
        return pop if before >= self.popularity(others[m - 1:m])[0] else others

    def _pair_times(self, user: UserState, row: int) -> np.ndarray:
        """Per item of `_recent(user)` (the user as they stood before a click on `row`), how many
        co-click pairs with `row` that click added: `CoClicks.add_click` pairs it once with each
        of the window's previous clicks."""
        paired = np.array(user.clicks[-self.coclicks.window:], np.int64)
        recent = np.array(self._recent(user), np.int64)
        return (recent[:, None] == paired[None, :]).sum(1) * (recent != row)

    def _most_clicked(self, m: int, among: np.ndarray | None = None) -> np.ndarray:
        """The m most-clicked rows of `among` (default: the live rows), ties to the larger
        learned bias, then to the lower row."""
        live = self._items.live_rows() if among is None else among
        m = min(len(live), m)
        score = self.popularity(live) + POP_TIEBREAK * self._bias[live]  # the learned prior breaks ties
        if m < len(live):  # the m best, and at the boundary the tied rows by the same tie rule
            kth = np.partition(score, len(live) - m)[len(live) - m]
            above, tied = np.flatnonzero(score > kth), np.flatnonzero(score == kth)
            top = np.concatenate([above, tied[np.argsort(live[tied], kind="stable")][: m - len(above)]])
        else:
            top = np.arange(len(live))
        return live[top[np.lexsort((live[top], -score[top]))]]

    def popularity(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The click counts popularity ranks by, of `rows` (default: every row's slot): raw, or
        decayed by `Config.popularity_half_life_s` when set."""
        h = self.config.popularity_half_life_s
        if h is None:
            return self._items.clicks if rows is None else self._items.clicks[rows]
        return self._items.decayed_clicks(np.arange(len(self._items)) if rows is None else rows, h)

    def candidates(self, user: UserState, index: VectorIndex, banned: np.ndarray, k: int = 0,
                   refresh: bool = False, allowed: np.ndarray | None = None,
                   ann: np.ndarray | None = None, before_click: int | None = None) -> np.ndarray:
        """Rows to score: the ANN neighbours of the user's query (`retrieve`, or k when more),
        the most co-clicked with the recent clicks, and the most clicked; topped up with the most
        clicked others when that leaves fewer than k. None of `banned` (int64 rows).

        `allowed` (bool by row, from filters.allowed_rows) restricts every source before it
        picks its best, so a filtered request still finds k rows whenever k qualify. `ann`: the
        ANN rows when already searched (`search_many`). `before_click`: the candidates as they
        were before `user` (as they stood then) clicked that row, whose click has been applied
        since: the row's own co-click pairs and its click taken out of the co-clicked and the
        most-clicked parts (else its own click could bring it in).
        """
        if allowed is not None:
            return self._filtered_candidates(user, index, banned, k, allowed, ann)
        parts = []
        if self.searches(user):
            parts.append(ann if ann is not None else
                         index.search(self.user_query(user), max(self.config.retrieve, k), exclude=banned)[0])
        banned_sorted = np.sort(banned)
        if self.config.coclick_candidates and user.clicks:
            less = None if before_click is None else (before_click, float(self._pair_times(user, before_click).sum()))
            near = self.coclicks.neighbours(self._recent(user), self.config.coclick_candidates + len(banned),
                                            less=less)
            near = near[~self._items.removed[near] & outside(near, banned_sorted)]
            parts.append(near[: self.config.coclick_candidates])
        if self.config.popular_candidates:
            pop = self.popular(self.config.popular_candidates + len(banned) + (before_click is not None), refresh)
            pop = pop[~self._items.removed[pop] & outside(pop, banned_sorted)]
            if before_click is not None:
                pop = self._popular_before(pop, before_click, self.config.popular_candidates)
            parts.append(pop[: self.config.popular_candidates])
        rows = sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        if len(rows) < k:  # k beyond the pool: the most clicked of the other allowed rows
            others = np.setdiff1d(self._items.live_rows(), np.union1d(rows, banned))
            rows = np.union1d(rows, self._most_clicked(k - len(rows), others))
        return rows

    def _filtered_candidates(self, user: UserState, index: VectorIndex, banned: np.ndarray, k: int,
                             allowed: np.ndarray, ann: np.ndarray | None) -> np.ndarray:
        """`candidates` under a filter: every source picks among the eligible rows only (one
        mask: allowed, live, not banned), FAISS through an IDSelector; nothing is dropped after."""
        ok = allowed & ~self._items.removed[: len(allowed)]
        ok[banned] = False
        parts = []
        if self.searches(user):
            parts.append(ann if ann is not None else
                         index.search(self.user_query(user), max(self.config.retrieve, k), allowed=ok)[0])
        if self.config.coclick_candidates and user.clicks:
            parts.append(self.coclicks.neighbours(self._recent(user), self.config.coclick_candidates, among=ok))
        eligible = np.flatnonzero(ok)
        if self.config.popular_candidates:
            parts.append(self._most_clicked(self.config.popular_candidates, eligible))
        rows = sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        if len(rows) < k:
            rows = np.union1d(rows, self._most_clicked(k - len(rows), np.setdiff1d(eligible, rows)))
        return rows

    def search_many(self, users: list[UserState], index: VectorIndex, banned: list[np.ndarray], k: int,
                    allowed: np.ndarray | None = None) -> list[np.ndarray | None]:
        """The ANN rows `candidates` would fetch for each user, in one FAISS call (None for a
        user who does not search).

        FAISS takes one selector per call, so the shared rules (live rows, `allowed`) act inside
        the search and each user's `banned` rows are looked past: the search fetches as many
        more rows as the longest `banned` list and each user's are then left out. On an exact
        index that is the single search's answer; on HNSW or IVF it can differ where the
        approximate search does.
        """
        out: list[np.ndarray | None] = [None] * len(users)
        who = [j for j, u in enumerate(users) if self.searches(u)]
        if not who:
            return out
        n = max(self.config.retrieve, k)
        queries = np.stack([self.user_query(users[j]) for j in who])
        found = index.search_batch(queries, n + max(len(banned[j]) for j in who), allowed=allowed)
        for j, (rows, _) in zip(who, found):
            if len(banned[j]):
                rows = rows[~np.isin(rows, banned[j])]
            out[j] = rows[:n]
        return out

    def searches(self, user: UserState) -> bool:
        """Whether the user's candidates include an ANN search (a vector, or a trained bias)."""
        return bool(user.vector.any() or self.trained)

    def user_query(self, user: UserState) -> np.ndarray:
        """The FAISS query of a user: `query` at the user's history length."""
        return self.query(user.vector, user.count + user.prior(self.profile_weight))

    def transient_user(self, rows: list[int], profile: str | None, profile_vec: np.ndarray | None) -> UserState:
        """A user built from `rows` (clicked item rows, oldest first) with the online rule, held by
        the caller only: the shared state (items, co-clicks, reranker) is not touched."""
        prof = None if profile_vec is None else self.projection.transform(profile_vec[None])[0]
        rows = list(dict.fromkeys(int(r) for r in rows))
        state = user_from_clicks(rows, self.item_vectors(np.array(rows, np.int64)), prof,
                                 self.config.user_min_step, self.profile_weight, profile, profile_vec)
        state.profile, state.profile_vec = profile, profile_vec
        return state

    def rebuild_coclicks(self, users: UserTable, skip: np.ndarray | None = None) -> None:
        """Co-click counts from every stored click history (on open and after fit), or from all
        but the users at positions `skip`."""
        gone = set() if skip is None else set(skip.tolist())
        states = [u for i, u in enumerate(users.states) if i not in gone]
        self.coclicks.build([u.clicks for u in states], len(self._items) if self._items else 0)

    def _recent(self, user: UserState) -> list[int]:
        return list(dict.fromkeys(user.recent(self.config.recent_window)))

    def features(self, user: UserState, rows: np.ndarray, as_cold: bool = False,
                 own_clicks: np.ndarray | None = None) -> np.ndarray:
        """The reranker's inputs for `rows`: `raw_features`, standardised by `rerank.expand`."""
        return expand(self.raw_features(user, rows, as_cold, own_clicks), user.count, user.profile_vec is not None)

    def raw_features(self, user: UserState, rows: np.ndarray, as_cold: bool = False,
                     own_clicks: np.ndarray | None = None, before_click: int | None = None) -> np.ndarray:
        """Shape (len(rows), N_FEATURES) float32; see rerank.FEATURES for the columns.

        `as_cold` shows the items as if they had just been added (text-only vector and bias, no
        clicks): training uses it so the reranker also learns to rank items without feedback.
        `own_clicks` is what the user's own later clicks added to the click counts; training
        subtracts it, and trains on co-clicks counted without its users (see Engine.fit), so that
        no feature reveals its label. `before_click`: the features as they stood before `user`
        (as they stood then) clicked that row, whose click has been applied since: its count,
        impression and co-click pairs taken out (the online step reads them so, after the click).
        """
        items = self._items
        if before_click is not None:
            own_clicks = (rows == before_click).astype(np.float64)
        if as_cold and self.trained:
            raw = items.vector_rows(rows)
            v, bias = self.projection.transform(raw), self.projection.bias(raw)
        else:
            v, bias = self.scoring_vectors(rows), self._bias[rows]
        f = np.zeros((len(rows), N_FEATURES), np.float32)
        f[:, _COL["tower"]] = self.projection.tau_for(user.count + user.prior(self.profile_weight)) * (v @ user.vector) + bias
        history = list(dict.fromkeys(user.clicks[-LEXICAL_HISTORY:]))
        f[:, _COL["lexical"]] = self.lexicon.similarity(np.array(history, np.int64), rows)
        clicks = items.clicks[rows] if own_clicks is None else np.maximum(items.clicks[rows] - own_clicks, 0)
        if as_cold:
            clicks = np.zeros(len(rows))
        f[:, _COL["clicks"]] = np.log1p(clicks)
        impressions = items.impressions[rows] if own_clicks is None else items.impressions[rows] - own_clicks
        impressions = np.zeros(len(rows)) if as_cold else np.maximum(impressions, clicks)
        f[:, _COL["ctr"]] = (clicks + 1.0) / (impressions + 2.0)
        recent = self._recent(user)
        if recent:
            f[:, _COL["recent"]] = (v @ self.scoring_vectors(np.array(recent)).T).max(axis=1)
        if recent and not as_cold:
            age = np.arange(len(recent) - 1, -1, -1)
            decay = RECENCY_DECAY ** age
            weights = np.stack([decay, decay / np.sqrt(1.0 + items.clicks[recent])])
            co, cf = self.coclicks.scores(recent, rows, weights)
            if before_click is not None:  # the pairs the click made with the clicks before it
                times = self._pair_times(user, before_click)
                at = rows == before_click
                co, cf = np.maximum(co - at * (weights[0] @ times), 0), np.maximum(cf - at * (weights[1] @ times), 0)
            f[:, _COL["cooc"]] = np.log1p(co)
            f[:, _COL["itemcf"]] = cf / np.sqrt(1.0 + clicks)
        if user.profile_vec is not None:
            f[:, _COL["profile"]] = items.vector_rows(rows) @ user.profile_vec
        f[:, _COL["fresh"]] = clicks == 0
        return f

    def score(self, user: UserState, rows: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        """Scores of `rows` for `user` (`raw`: their `raw_features`, when already computed)."""
        if user.count == 0 and user.profile_vec is None:
            # nothing is known of this user: the exact popularity prior (the learned bias breaks
            # ties), which the bucket-0 weights only approximated (0.86x popularity on movielens)
            return (np.log1p(self.popularity(rows)) + POP_TIEBREAK * self._bias[rows]).astype(np.float32)
        if self.trained or self.reranker.trained:
            raw = self.raw_features(user, rows) if raw is None else raw
            return self.reranker.score(expand(raw, user.count, user.profile_vec is not None))
        sim = self.scoring_vectors(rows) @ user.vector
        top = max(self._top_popularity(), 1.0)
        pop = np.log1p(self.popularity(rows)) / np.log1p(top)
        return (sim + pop / (1.0 + user.count + user.prior(self.profile_weight))).astype(np.float32)

    def _top_popularity(self) -> float:
        """The largest popularity among the live rows: from the cached popular list when there
        is one (O(list); it holds the top rows exactly), else one pass over the live rows."""
        cache = self._pop_cache
        rows = cache if cache is not None and len(cache) else self._items.live_rows()
        return float(self.popularity(rows).max()) if len(rows) else 0.0

    def explore_bonus(self, user: UserState, rows: np.ndarray, scores: np.ndarray, user_key: str) -> np.ndarray:
        """Thompson sampling on each item's Beta CTR posterior, as a bounded bonus.

        The bonus is w * spread * clip((theta - mean) / sd_prior, -2, 2): large for items with no
        feedback, vanishing as impressions accumulate. The draw is seeded by the engine's seed, the
        user and the user's event count, so a given state always gives the same list.
        """
        items = self._items
        seed = [self.config.seed, zlib.crc32(user_key.encode("utf-8", "surrogatepass")),
                user.count, len(user.skips), user.impressions]
        rng = np.random.default_rng(seed)
        clicks = items.clicks[rows]
        a = 1.0 + clicks
        b = 1.0 + np.maximum(items.impressions[rows] - clicks, 0.0)
        theta = rng.beta(a, b)
        z = np.minimum(np.maximum((theta - a / (a + b)) / PRIOR_SD, -EXPLORE_CLIP), EXPLORE_CLIP)
        spread = float(scores.std()) if len(scores) > 1 else 1.0
        return (self.config.explore_weight * spread * z).astype(np.float32)

    def rank(self, user: UserState, index: VectorIndex, k: int, banned: np.ndarray,
             cand_rows: np.ndarray | None, user_key: str = "", refresh: bool = False,
             allowed: np.ndarray | None = None, ann: np.ndarray | None = None, diversity: float = 0.0
             ) -> tuple[np.ndarray, np.ndarray]:
        """The top k of `cand_rows` (default: `candidates`, within `allowed`) for `user`: (rows,
        scores), best first; with `diversity` > 0 in maximal-marginal-relevance order (each row
        keeps its score). Reads only, unless `refresh` (the caller holds the write lock; see
        `popular`)."""
        rows = self.candidates(user, index, banned, k, refresh, allowed, ann) if cand_rows is None else cand_rows
        if len(rows) == 0:
            return rows, np.zeros(0, np.float32)
        scores = self.score(user, rows)
        if self.config.explore and self.config.explore_weight > 0:
            scores = scores + self.explore_bonus(user, rows, scores, user_key)
        if diversity > 0:
            top = mmr(scores, self.scoring_vectors(rows), k, diversity)
        else:
            top = np.argsort(-scores, kind="stable")[:k]
        listed, listed_scores = rows[top], scores[top]
        if self.config.explore and self.config.new_item_slots > 0 and self.reranker.catalog_rows >= 0:
            extra = (lambda: np.zeros(0, np.int64)) if cand_rows is not None else \
                (lambda: self._recent_new(banned, allowed))
            listed, listed_scores = self.with_new_items(user, listed, listed_scores, rows, extra, k, user_key)
        return listed, listed_scores

    def new_items(self, rows: np.ndarray) -> np.ndarray:
        """Which of `rows` are new to the learned parts: added after the reranker's fit (a later
        row, or a later add time: `Reranker.catalog_rows`, `catalog_until`) and without any
        feedback yet. None before a fit."""
        rr = self.reranker
        if rr.catalog_rows < 0:
            return np.zeros(len(rows), bool)
        later = (rows >= rr.catalog_rows) | (self._items.added_at[rows] > rr.catalog_until)
        return later & (self._items.impressions[rows] == 0)

    def _recent_new(self, banned: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """The live rows added since the fit (the last NEW_ITEM_POOL of them), not banned and
        within `allowed`: new items retrieval may not have reached (their vectors sit where text
        alone puts them)."""
        start = self.reranker.catalog_rows
        if start < 0 or start >= len(self._items):
            return np.zeros(0, np.int64)
        rows = np.arange(max(start, len(self._items) - NEW_ITEM_POOL), len(self._items), dtype=np.int64)
        ok = ~self._items.removed[rows] & ~np.isin(rows, banned)
        if allowed is not None:
            ok &= allowed[rows] if len(allowed) >= len(self._items) else np.isin(rows, np.flatnonzero(allowed))
        return rows[ok]

    def text_match(self, user: UserState, rows: np.ndarray) -> np.ndarray:
        """How well the text of `rows` matches the user: the lexical (TF-IDF) cosine to the user's
        clicked items, the reranker's `lexical` input; for a user without clicks, the cosine of
        the item's vector to the user's (the profile's)."""
        history = list(dict.fromkeys(user.clicks[-LEXICAL_HISTORY:]))
        if history:
            return self.lexicon.similarity(np.array(history, np.int64), rows)
        return self.scoring_vectors(rows) @ user.vector

    def with_new_items(self, user: UserState, listed: np.ndarray, scores: np.ndarray, candidates: np.ndarray,
                       extra: Callable[[], np.ndarray], k: int, user_key: str) -> tuple[np.ndarray, np.ndarray]:
        """The list (`listed` rows, best first, and their `scores`) with up to `new_item_slots` of
        its last places given to new items (`new_items`) of the scored `candidates` or of `extra()`
        (rows retrieval may not reach; called only when a slot is free) whose text matches the
        user (`text_match`) better than the median of the candidates does: closer to the user
        than half of what retrieval found. Among them a Thompson draw from Beta(1 + c q,
        1 + c (1 - q)), q the item's match quantile among the candidates and c = NEW_ITEM_PRIOR.
        A new item already listed counts against the slots; the list never becomes new items
        only; a slot keeps the score of the place it takes. Seeded as `explore_bonus`."""
        slots = min(self.config.new_item_slots, max(len(listed) - 1, 0), max(k - 1, 0))
        slots -= int(self.new_items(listed).sum())
        if slots <= 0 or not (user.clicks or user.vector.any()):
            return listed, scores
        pool = candidates[self.new_items(candidates)]
        more = extra()
        pool = np.union1d(pool, more[self.new_items(more)]) if len(more) else pool
        pool = pool[~np.isin(pool, listed)]
        if not len(pool):
            return listed, scores
        match = self.text_match(user, pool)
        ref = np.sort(self.text_match(user, candidates))
        quantile = np.searchsorted(ref, match, side="left") / max(len(ref), 1)
        fits = (quantile > 0.5) & (match > 0)
        pool, quantile = pool[fits], quantile[fits]
        if not len(pool):
            return listed, scores
        rng = np.random.default_rng([self.config.seed, zlib.crc32(user_key.encode("utf-8", "surrogatepass")),
                                     user.count, len(user.skips), user.impressions, 1])
        theta = rng.beta(1.0 + NEW_ITEM_PRIOR * quantile, 1.0 + NEW_ITEM_PRIOR * (1.0 - quantile))
        picked = pool[np.argsort(-theta, kind="stable")[:slots]]
        keep = len(listed) - len(picked) if len(listed) >= k else len(listed)
        out_scores = np.concatenate([scores[:keep], scores[keep:][: len(picked)] if len(listed) >= k
                                     else np.full(len(picked), scores[-1], np.float32)])
        return np.concatenate([listed[:keep], picked]), out_scores.astype(np.float32)

    # ---- persistence -------------------------------------------------------------------------
    def model_tensors(self, proj: Projection) -> dict[str, np.ndarray]:
        out = dict(proj.tensors())
        n = len(self._items) if self._items is not None else 0
        if self._warm is not None:
            out.update(self._warm.below(n).tensors())
        out.update(self.reranker.tensors())
        out[PROFILE_WEIGHT_TENSOR] = np.array([self.profile_weight], np.float64)
        return out

    def load_models(self, tensors: dict[str, np.ndarray], d_text: int) -> Projection:
        proj = Projection.from_tensors(tensors, d_text)
        self._warm = WarmResiduals.from_tensors(tensors)
        self.reranker.load(tensors)
        self.profile_weight = profile_weight_from(tensors)
        self.projection = proj
        self.prepare()
        return proj

    def set_towers(self, proj: Projection, residual: np.ndarray, item_bias: np.ndarray) -> None:
        self.projection, self._warm = proj, WarmResiduals.from_dense(residual, item_bias)


class WarmResiduals:
    """The item tower's learned residuals (vector and bias), held for the warm items only: the
    rows that had clicks when the towers were fit (sorted), their residual vectors and biases.

    Every other item's residual is zero, so a dense (items, d_out) array spent 4 * d_out bytes
    an item (512 at d_out 128: a third of the raw vectors again) mostly on zeros. Saved as
    `tower.warm_rows`, `tower.warm_residual`, `tower.warm_bias`; a dense `tower.residual` and
    `tower.item_bias` (stores written before) load too.
    """

    def __init__(self, rows: np.ndarray, residual: np.ndarray, bias: np.ndarray) -> None:
        self.rows = np.asarray(rows, np.int64)
        self.residual = np.asarray(residual, np.float32).reshape(len(self.rows), -1)
        self.bias = np.asarray(bias, np.float32)

    @classmethod
    def empty(cls, dim: int) -> "WarmResiduals":
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.float32))

    @classmethod
    def from_dense(cls, residual: np.ndarray, bias: np.ndarray) -> "WarmResiduals":
        """From one residual row and bias per item (zero for the cold ones)."""
        warm = np.flatnonzero(np.asarray(residual).any(axis=1) | (np.asarray(bias) != 0))
        return cls(warm, residual[warm], bias[warm])

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> "WarmResiduals | None":
        if "tower.warm_rows" in t:
            return cls(t["tower.warm_rows"], t["tower.warm_residual"], t["tower.warm_bias"])
        if "tower.residual" in t:
            return cls.from_dense(t["tower.residual"], t["tower.item_bias"])
        return None

    def tensors(self) -> dict[str, np.ndarray]:
        return {"tower.warm_rows": self.rows, "tower.warm_residual": self.residual, "tower.warm_bias": self.bias}

    def below(self, n: int) -> "WarmResiduals":
        """Those of rows < n."""
        return self._kept(self.rows < n)

    def without(self, rows: np.ndarray) -> "WarmResiduals":
        """Those of rows other than `rows` (items replaced or added: no audience yet)."""
        return self._kept(outside(self.rows, np.sort(np.asarray(rows, np.int64))))

    def _kept(self, keep: np.ndarray) -> "WarmResiduals":
        return self if keep.all() else WarmResiduals(self.rows[keep], self.residual[keep], self.bias[keep])


def user_from_clicks(rows: list[int], vecs: np.ndarray, profile: np.ndarray | None, min_step: float,
                     profile_weight: float = 1.0, profile_text: str | None = None,
                     profile_vec: np.ndarray | None = None) -> UserState:
    """A user state built click by click with the online rule, as a stored user with the same
    profile and clicks has it: the vector starts at `profile` (the profile in retrieval space),
    which counts `profile_weight` clicks; the state keeps `profile_text` and `profile_vec` (its
    text-space vector). For training examples and stateless requests."""
    u = UserState(vector=np.zeros(vecs.shape[1], np.float32) if profile is None else normalise(profile))
    if profile is not None and profile_vec is not None:
        u.profile, u.profile_vec = profile_text, profile_vec
    for r, v in zip(rows, vecs):
        apply_click(u, v, min_step, profile_weight)
        u.clicks.append(int(r))
    return u


__all__ = ["NeedsWrite", "Ranker", "user_from_clicks"]

"""Candidates, scores and exploration: everything between a user state and a list.

A Ranker reads the retrieval space (serving/space.py: item vectors and biases from the item
tower), the popular list (serving/popular.py), the features (serving/features.py) and the
reranker (models/rerank.py). Candidates are the ANN neighbours of the user's query plus the
co-clicked and the most-clicked items; the reranker scores them; exploration adds a bounded bonus
to items with little feedback, and a new item may take a list's last place. Until anything is
trained the score is a fixed blend of similarity and popularity whose popularity weight fades as
the user's history grows. It reads only: an event's effects on the state are applied by
runtime/state.py.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

from ..config import Config
from ..models.projection import Projection
from ..models.rerank import Reranker, expand
from ..state.coclick import CoClicks
from ..state.items import ItemTable
from ..state.lexical import Lexicon
from ..state.users import UserState
from ..vectors import outside, sorted_unique
from .backend import VectorBackend
from .diversity import mmr
from .features import Features
from .index import VectorIndex
from .popular import POP_TIEBREAK, NeedsWrite, PopularList
from .space import RetrievalSpace, user_from_clicks

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


class Ranker:
    """Ranks for one store: reads its space, counts, co-clicks and lexicon (`coclicks` and
    `lexicon` are the State's tables), scores with its reranker."""

    def __init__(self, config: Config, coclicks: CoClicks, lexicon: Lexicon) -> None:
        self.config = config
        self.space = RetrievalSpace()
        self.popular = PopularList(config, self.space)
        self.coclicks, self.lexicon = coclicks, lexicon
        self.features = Features(config, self.space, coclicks, lexicon)
        #: How many clicks a user's profile weighs in the user's vector (`UserState.prior`):
        #: learned by `fit` from the training users' profiles (training/fit.py, profile_weight);
        #: one click where no training user had one.
        self.profile_weight = DEFAULT_PROFILE_WEIGHT
        self.reset_reranker()

    @property
    def trained(self) -> bool:
        """Is the item tower trained (the retrieval space no longer the text space)?"""
        return self.space.trained

    @property
    def index(self) -> VectorBackend | None:
        return self.space.index

    @index.setter
    def index(self, index: VectorBackend | None) -> None:
        self.space.index = index

    def refresh(self, items: ItemTable, proj: Projection) -> None:
        """Every item's retrieval vector and bias again (after open or training)."""
        self.space.refresh(items, proj)
        self.popular.invalidate()

    def items_added(self, items: ItemTable, proj: Projection, rows: np.ndarray) -> None:
        self.space.added(items, proj, rows)
        self.popular.invalidate()

    def reset_reranker(self) -> None:
        """A fresh, untrained reranker with the configured seed (what `fit` trains from)."""
        c = self.config
        self.reranker = Reranker(c.rerank_hidden, c.online_lr, c.replay_size, c.replay_batch, c.seed, c.online_pull)

    def prepare(self) -> None:
        """Draw the reranker's initial weights now (a writer) if serving will score with them,
        so that no request has to: only a trained tower without a trained reranker needs it."""
        if self.trained and not self.reranker.trained:
            self.reranker.weights  # noqa: B018 - drawn and kept

    # ---- the online step ---------------------------------------------------------------------
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
        raw = self.features.raw(user, cand, self.profile_weight, before_click=row if applied else None)
        if len(cand) > ONLINE_CANDIDATES:
            best = np.argsort(-self.score(user, cand, raw), kind="stable")[:ONLINE_CANDIDATES]
            cand, raw = cand[best], raw[best]
        label = np.flatnonzero(cand == row)
        if len(label) == 0 or len(cand) < 2:
            return None
        return expand(raw, user.count, user.profile_vec is not None), label

    # ---- candidates --------------------------------------------------------------------------
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
            less = (None if before_click is None
                    else (before_click, float(self.features.pair_times(user, before_click).sum())))
            near = self.coclicks.neighbours(self.features.recent(user), self.config.coclick_candidates + len(banned),
                                            less=less)
            near = near[~self.space.items.removed[near] & outside(near, banned_sorted)]
            parts.append(near[: self.config.coclick_candidates])
        if self.config.popular_candidates:
            pop = self.popular.top(self.config.popular_candidates + len(banned) + (before_click is not None), refresh)
            pop = pop[~self.space.items.removed[pop] & outside(pop, banned_sorted)]
            if before_click is not None:
                pop = self.popular.before(pop, before_click, self.config.popular_candidates)
            parts.append(pop[: self.config.popular_candidates])
        rows = sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        if len(rows) < k:  # k beyond the pool: the most clicked of the other allowed rows
            others = np.setdiff1d(self.space.items.live_rows(), np.union1d(rows, banned))
            rows = np.union1d(rows, self.popular.most_clicked(k - len(rows), others))
        return rows

    def _filtered_candidates(self, user: UserState, index: VectorIndex, banned: np.ndarray, k: int,
                             allowed: np.ndarray, ann: np.ndarray | None) -> np.ndarray:
        """`candidates` under a filter: every source picks among the eligible rows only (one
        mask: allowed, live, not banned), FAISS through an IDSelector; nothing is dropped after."""
        ok = allowed & ~self.space.items.removed[: len(allowed)]
        ok[banned] = False
        parts = []
        if self.searches(user):
            parts.append(ann if ann is not None else
                         index.search(self.user_query(user), max(self.config.retrieve, k), allowed=ok)[0])
        if self.config.coclick_candidates and user.clicks:
            parts.append(self.coclicks.neighbours(self.features.recent(user), self.config.coclick_candidates, among=ok))
        eligible = np.flatnonzero(ok)
        if self.config.popular_candidates:
            parts.append(self.popular.most_clicked(self.config.popular_candidates, eligible))
        rows = sorted_unique(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
        if len(rows) < k:
            rows = np.union1d(rows, self.popular.most_clicked(k - len(rows), np.setdiff1d(eligible, rows)))
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
        return self.space.query(user.vector, user.count + user.prior(self.profile_weight))

    def transient_user(self, rows: list[int], profile: str | None, profile_vec: np.ndarray | None) -> UserState:
        """A user built from `rows` (clicked item rows, oldest first) with the online rule, held by
        the caller only: the shared state (items, co-clicks, reranker) is not touched."""
        prof = None if profile_vec is None else self.space.projection.transform(profile_vec[None])[0]
        rows = list(dict.fromkeys(int(r) for r in rows))
        state = user_from_clicks(rows, self.space.item_vectors(np.array(rows, np.int64)), prof,
                                 self.config.user_min_step, self.profile_weight, profile, profile_vec)
        state.profile, state.profile_vec = profile, profile_vec
        return state

    # ---- scores and the list -----------------------------------------------------------------
    def raw_features(self, user: UserState, rows: np.ndarray, as_cold: bool = False,
                     own_clicks: np.ndarray | None = None) -> np.ndarray:
        """`features.raw` at this ranker's profile weight."""
        return self.features.raw(user, rows, self.profile_weight, as_cold, own_clicks)

    def expanded_features(self, user: UserState, rows: np.ndarray, as_cold: bool = False,
                          own_clicks: np.ndarray | None = None) -> np.ndarray:
        """The reranker's inputs for `rows`: `raw_features`, standardised by `rerank.expand`."""
        return expand(self.raw_features(user, rows, as_cold, own_clicks), user.count, user.profile_vec is not None)

    def score(self, user: UserState, rows: np.ndarray, raw: np.ndarray | None = None) -> np.ndarray:
        """Scores of `rows` for `user` (`raw`: their `raw_features`, when already computed)."""
        if user.count == 0 and user.profile_vec is None:
            # nothing is known of this user: the exact popularity prior (the learned bias breaks
            # ties), which the bucket-0 weights only approximated (0.86x popularity on movielens)
            return (np.log1p(self.popular.popularity(rows)) + POP_TIEBREAK * self.space.bias[rows]).astype(np.float32)
        if self.trained or self.reranker.trained:
            raw = self.features.raw(user, rows, self.profile_weight) if raw is None else raw
            return self.reranker.score(expand(raw, user.count, user.profile_vec is not None))
        sim = self.space.scoring_vectors(rows) @ user.vector
        top = max(self.popular.highest(), 1.0)
        pop = np.log1p(self.popular.popularity(rows)) / np.log1p(top)
        return (sim + pop / (1.0 + user.count + user.prior(self.profile_weight))).astype(np.float32)

    def explore_bonus(self, user: UserState, rows: np.ndarray, scores: np.ndarray, user_key: str) -> np.ndarray:
        """Thompson sampling on each item's Beta CTR posterior, as a bounded bonus.

        The bonus is w * spread * clip((theta - mean) / sd_prior, -2, 2): large for items with no
        feedback, vanishing as impressions accumulate. The draw is seeded by the engine's seed, the
        user and the user's event count, so a given state always gives the same list.
        """
        items = self.space.items
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
            top = mmr(scores, self.space.scoring_vectors(rows), k, diversity)
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
        later = (rows >= rr.catalog_rows) | (self.space.items.added_at[rows] > rr.catalog_until)
        return later & (self.space.items.impressions[rows] == 0)

    def _recent_new(self, banned: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """The live rows added since the fit (the last NEW_ITEM_POOL of them), not banned and
        within `allowed`: new items retrieval may not have reached (their vectors sit where text
        alone puts them)."""
        start = self.reranker.catalog_rows
        if start < 0 or start >= len(self.space.items):
            return np.zeros(0, np.int64)
        rows = np.arange(max(start, len(self.space.items) - NEW_ITEM_POOL), len(self.space.items), dtype=np.int64)
        ok = ~self.space.items.removed[rows] & ~np.isin(rows, banned)
        if allowed is not None:
            ok &= allowed[rows] if len(allowed) >= len(self.space.items) else np.isin(rows, np.flatnonzero(allowed))
        return rows[ok]

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
        match = self.features.text_match(user, pool)
        ref = np.sort(self.features.text_match(user, candidates))
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
        out = self.space.tensors(proj)
        out.update(self.reranker.tensors())
        out[PROFILE_WEIGHT_TENSOR] = np.array([self.profile_weight], np.float64)
        return out

    def load_models(self, tensors: dict[str, np.ndarray], d_text: int) -> Projection:
        proj = self.space.load(tensors, d_text)
        self.reranker.load(tensors)
        self.profile_weight = profile_weight_from(tensors)
        self.prepare()
        return proj


__all__ = ["NeedsWrite", "Ranker", "user_from_clicks"]

"""Candidate generation and scoring: ANN neighbours of the user plus the popular items, then a score.

The Ranker owns everything between a user state and a ranked list: the retrieval vectors of items
(text vectors through the projection), the popularity prior, the per-event online update, and the
scorer. Until a reranker is trained the score is a fixed blend of similarity and popularity whose
popularity weight fades as the user's history grows.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .config import Config
from .index import VectorIndex
from .items import ItemTable
from .projection import Projection
from .users import UserState, apply_click, apply_skip

POP_REFRESH_CLICKS = 64


class Ranker:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.projection: Projection | None = None
        self._item_vecs: np.ndarray | None = None  # retrieval vectors when they differ from raw ones
        self._items: ItemTable | None = None
        self._pop_cache: np.ndarray | None = None
        self._pop_stale = 0

    # ---- item vectors ------------------------------------------------------------------------
    @property
    def trained(self) -> bool:
        return self.projection is not None and self.projection.trained

    def refresh_item_vectors(self, items: ItemTable, proj: Projection) -> None:
        self._items, self.projection = items, proj
        self._item_vecs = proj.transform(items.vectors) if proj.trained else None
        self._pop_cache = None

    def item_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Retrieval vectors of `rows`: shape (len(rows), d_out), float32."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._item_vecs is None:
            return np.ascontiguousarray(self._items.vectors[rows])
        return np.ascontiguousarray(self._item_vecs[rows])

    def on_items_added(self, items: ItemTable, proj: Projection, rows: np.ndarray) -> None:
        self._items, self.projection = items, proj
        if self._item_vecs is not None:
            need = len(items)
            if len(self._item_vecs) < need:
                grown = np.zeros((max(need, 2 * len(self._item_vecs)), proj.d_out), np.float32)
                grown[: len(self._item_vecs)] = self._item_vecs
                self._item_vecs = grown
            self._item_vecs[rows] = proj.transform(items.vectors[rows])
        self._pop_cache = None

    def on_items_removed(self, rows: np.ndarray) -> None:
        self._pop_cache = None

    # ---- online learning ---------------------------------------------------------------------
    def on_event(self, user: UserState, row: int, kind: str, value: float, t: int, items: ItemTable,
                 learn: bool = True, sgd: bool = True) -> None:
        """Apply one event to the user's vector and the item's statistics."""
        if not learn:
            return
        vec = self.item_vectors(np.array([row]))[0]
        if kind == "click":
            apply_click(user, vec, self.config.user_min_step)
            items.clicks[row] += 1.0
            items.impressions[row] += 1.0
            self._pop_stale += 1
            if self._pop_stale >= POP_REFRESH_CLICKS:
                self._pop_cache = None
        elif kind == "skip":
            apply_skip(user, vec, self.config.user_min_step, self.config.skip_step)
            items.skips[row] += 1.0
            items.impressions[row] += 1.0
        else:
            items.impressions[row] += 1.0

    # ---- candidates and scores ---------------------------------------------------------------
    def popular(self, n: int) -> np.ndarray:
        """The n most-clicked live rows (cached, refreshed every few dozen clicks)."""
        items = self._items
        if self._pop_cache is None or len(self._pop_cache) < n:
            live = items.live_rows()
            m = min(len(live), max(4 * n, 256))
            clicks = items.clicks[live]
            top = np.argpartition(-clicks, m - 1)[:m] if m < len(live) else np.arange(len(live))
            order = top[np.lexsort((live[top], -clicks[top]))]
            self._pop_cache, self._pop_stale = live[order], 0
        return self._pop_cache

    def candidates(self, user: UserState, index: VectorIndex, banned: np.ndarray) -> np.ndarray:
        parts = []
        if user.vector.any():
            rows, _ = index.search(user.vector, self.config.retrieve, exclude=banned)
            parts.append(rows)
        if self.config.popular_candidates:
            pop = self.popular(self.config.popular_candidates + len(banned))
            pop = pop[~self._items.removed[pop]]
            if len(banned):
                pop = pop[~np.isin(pop, banned)]
            parts.append(pop[: self.config.popular_candidates])
        if not parts:
            return np.zeros(0, np.int64)
        return np.unique(np.concatenate(parts))

    def score(self, user: UserState, rows: np.ndarray) -> np.ndarray:
        items = self._items
        sim = self.item_vectors(rows) @ user.vector
        top = max(float(items.clicks.max()) if len(items) else 0.0, 1.0)
        pop = np.log1p(items.clicks[rows]) / np.log1p(top)
        weight = 1.0 / (1.0 + user.count + user.prior)
        return (sim + weight * pop).astype(np.float32)

    def rank(self, user: UserState, items: ItemTable, index: VectorIndex, k: int, banned: np.ndarray,
             cand_rows: np.ndarray | None, user_key: str = "") -> tuple[np.ndarray, np.ndarray]:
        self._items = items
        rows = self.candidates(user, index, banned) if cand_rows is None else cand_rows
        if len(rows) == 0:
            return rows, np.zeros(0, np.float32)
        scores = self.score(user, rows)
        top = np.argsort(-scores, kind="stable")[:k]
        return rows[top], scores[top]

    # ---- training and persistence ------------------------------------------------------------
    def fit(self, events: list[dict[str, Any]], items: ItemTable, users, progress: bool | None = None
            ) -> dict[str, Any]:
        self._items = items
        self._pop_cache = None
        return {"events": len(events), "projection": False, "reranker": False}

    def model_tensors(self, proj: Projection) -> dict[str, np.ndarray]:
        return {} if not proj.trained else {"projection.weight": proj.weight}

    def load_models(self, tensors: dict[str, np.ndarray], d_text: int) -> Projection:
        return Projection(d_text, tensors.get("projection.weight"))

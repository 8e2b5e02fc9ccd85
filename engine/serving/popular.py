"""The popular list: the most clicked live items, cached and kept exact click by click.

Popularity is what a user without history is shown, one of every user's candidate sources, and
the untrained blend's prior. Counting is the item table's (state/items.py); this module ranks by
the counts (raw, or decayed by `Config.popularity_half_life_s`) and caches the top of the ranking.
"""

from __future__ import annotations

import numpy as np

from ..config import Config
from .space import RetrievalSpace

#: The popular list holds at least this many rows (4x what its first request needs, when more),
#: so that requests with longer exclusions rarely need a rebuild.
POP_MIN_CACHE = 256
#: Weight of the learned popularity bias against log clicks where both rank (a tie-breaker).
POP_TIEBREAK = 1e-3


class NeedsWrite(Exception):
    """A request found a cache to rebuild; it runs again holding the write lock."""


class PopularList:
    """The most clicked live rows of `space.items`, ties to the larger learned bias."""

    def __init__(self, config: Config, space: RetrievalSpace) -> None:
        self.config, self.space = config, space
        self.cache: np.ndarray | None = None

    def invalidate(self) -> None:
        self.cache = None

    def top(self, n: int, refresh: bool = False) -> np.ndarray:
        """At least the n most-clicked live rows, best first (fewer when fewer are live).

        The list is cached and kept exact click by click (`bump`, O(list) per click); it is
        dropped when items come or go or the learned prior changes, and rebuilt (O(items)) by the
        first request that finds it missing or too short. A rebuild is a write: with `refresh`
        false (the caller holds only the read lock) a request that needs one raises NeedsWrite,
        and the engine asks again under the write lock. Readers never change it.
        """
        cache = self.cache
        if cache is not None and len(cache) >= n:
            return cache
        if not refresh:
            raise NeedsWrite("the popular list must be rebuilt")
        self.cache = self.most_clicked(max(4 * n, POP_MIN_CACHE))
        return self.cache

    def bump(self, row: int) -> None:
        """One more click on `row` (a write; only its score rose): the cached top list stays the
        exact top list. `row` moves up within it, or takes the last place's slot when it now
        ranks above that item. Decay scales every item's score alike, so it changes no order."""
        cache = self.cache
        if cache is None:
            return
        if not (cache == row).any():  # (a list that holds every live row holds `row`)
            pair = np.array([cache[-1], row], np.int64)
            if self.most_clicked(1, pair)[0] != row:
                return
            cache = np.append(cache[:-1], row)
        self.cache = self.most_clicked(len(cache), cache)

    def before(self, pop: np.ndarray, row: int, m: int) -> np.ndarray:
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

    def most_clicked(self, m: int, among: np.ndarray | None = None) -> np.ndarray:
        """The m most-clicked rows of `among` (default: the live rows), ties to the larger
        learned bias, then to the lower row."""
        live = self.space.items.live_rows() if among is None else among
        m = min(len(live), m)
        score = self.popularity(live) + POP_TIEBREAK * self.space.bias[live]  # the learned prior breaks ties
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
        items, h = self.space.items, self.config.popularity_half_life_s
        if h is None:
            return items.clicks if rows is None else items.clicks[rows]
        return items.decayed_clicks(np.arange(len(items)) if rows is None else rows, h)

    def highest(self) -> float:
        """The largest popularity among the live rows: from the cached list when there is one
        (O(list); it holds the top rows exactly), else one pass over the live rows."""
        cache = self.cache
        rows = cache if cache is not None and len(cache) else self.space.items.live_rows()
        return float(self.popularity(rows).max()) if len(rows) else 0.0


__all__ = ["NeedsWrite", "PopularList", "POP_TIEBREAK"]

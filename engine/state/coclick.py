"""Co-click counts: how often two items were clicked by the same user within a few clicks.

This is the item statistic that says "people who clicked this also clicked that", the signal a new
user's first click carries best (a content vector says what the item is about, not who watches
it). A click pairs with each of the user's previous `window` clicks, in both directions; the
counts are rebuilt from the stored click histories when a store opens (so they need no file of
their own and the event log restores them after a crash) and grow online with every click.

Counts live in a CSR matrix plus a small overlay of the pairs counted since it was built; the
overlay is folded into the matrix once it holds FOLD_AT pairs, so a lookup on the request path
never walks a dictionary that grows with uptime. Memory is bounded by clicks x window pairs.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np

from ..vectors import find_sorted, slices, sorted_unique

#: A click pairs with this many of the user's previous clicks.
WINDOW = 20
#: Overlay pairs (new since the matrix was built) at which they are folded into the matrix.
FOLD_AT = 20_000


class CoClicks:
    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self._indptr = np.zeros(2, np.int64)  # an empty 1 x 1 matrix
        self._indices = np.zeros(0, np.int64)
        self._counts = np.zeros(0, np.float32)
        self._n = 1
        self._extra: defaultdict[int, defaultdict[int, float]] = defaultdict(lambda: defaultdict(float))
        self._extra_pairs = 0

    def build(self, histories: Sequence[Sequence[int]], n_items: int) -> None:
        """Count every pair of clicks at most `window` apart in each history (in click order)."""
        import scipy.sparse as sp

        src, dst = [], []
        for h in histories:
            s = np.asarray(h, np.int64)
            for d in range(1, min(self.window, len(s) - 1) + 1):
                a, b = s[:-d], s[d:]
                keep = a != b
                src += [a[keep], b[keep]]
                dst += [b[keep], a[keep]]
        n = self._n = max(n_items, 1)
        if src:
            rows, cols = np.concatenate(src), np.concatenate(dst)
            m = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
            m.sum_duplicates()
            self._indptr, self._indices = m.indptr.astype(np.int64), m.indices.astype(np.int64)
            self._counts = m.data.astype(np.float32)
        else:
            self._indptr, self._indices = np.zeros(n + 1, np.int64), np.zeros(0, np.int64)
            self._counts = np.zeros(0, np.float32)
        self._extra.clear()
        self._extra_pairs = 0

    def add_click(self, previous: Sequence[int], row: int) -> None:
        """Pair a new click on `row` with the user's previous clicks (oldest first)."""
        for j in previous[-self.window:]:
            if j != row:
                self._extra_pairs += (row not in self._extra[j]) + (j not in self._extra[row])
                self._extra[j][row] += 1.0
                self._extra[row][j] += 1.0
        if self._extra_pairs >= FOLD_AT:
            self._fold()

    def _fold(self) -> None:
        """Add the overlay into the CSR matrix (growing it for rows added since) and empty it."""
        import scipy.sparse as sp

        rows = [j for j, d in self._extra.items() for _ in d]
        cols = [i for d in self._extra.values() for i in d]
        vals = [c for d in self._extra.values() for c in d.values()]
        n = max(self._n, max(rows) + 1, max(cols) + 1) if rows else self._n
        base = sp.csr_matrix((self._counts, self._indices, self._indptr), shape=(self._n, self._n))
        base.resize((n, n))
        m = (base + sp.csr_matrix((np.asarray(vals, np.float32), (rows, cols)), shape=(n, n))).tocsr()
        m.sum_duplicates()
        self._n = n
        self._indptr, self._indices = m.indptr.astype(np.int64), m.indices.astype(np.int64)
        self._counts = m.data.astype(np.float32)
        self._extra.clear()
        self._extra_pairs = 0

    def scores(self, sources: Sequence[int], rows: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """For each of `rows`, the co-click count with the items in `sources`, summed (each
        source's counts times its weight in `weights`, aligned with `sources`, when given).

        `weights` of shape (m, len(sources)) gives m weightings at once, shape (m, len(rows)):
        each row of the result is what that weighting alone gives. Every source's matrix row is
        read in one gather and matched against `rows` in one search (the overlay, small, per source).
        """
        many = weights is not None and np.ndim(weights) == 2
        w_sets = (np.ones((1, len(sources))) if weights is None else
                  np.asarray(weights, np.float64).reshape(-1, len(sources)))
        out = np.zeros((len(w_sets), len(rows)), np.float32)
        if len(sources) and len(rows):
            src = np.asarray(sources, np.int64)
            cols, counts, owner = self._gather(src)
            order = np.argsort(rows, kind="stable")
            sorted_rows = np.asarray(rows)[order]
            pos, hit = find_sorted(sorted_rows, cols)
            at, got, who = order[pos[hit]], counts[hit].astype(np.float64), owner[hit]
            for m, w in enumerate(w_sets):
                out[m] = np.bincount(at, weights=w[who] * got, minlength=len(rows))
        return out if many else out[0]

    def _gather(self, sources: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (columns, counts, position in `sources`) of every source's pairs: matrix and overlay."""
        inside = sources + 1 < len(self._indptr)
        safe = np.where(inside, sources, 0)
        lo = self._indptr[safe]
        lens = np.where(inside, self._indptr[safe + 1] - lo, 0)
        _, pick = slices(lo, lens)
        cols, counts = [self._indices[pick]], [self._counts[pick]]
        owner = [np.repeat(np.arange(len(sources)), lens)]
        if self._extra:
            for n, j in enumerate(sources.tolist()):
                extra = self._extra.get(j)
                if extra:
                    cols.append(np.fromiter(extra.keys(), np.int64, len(extra)))
                    counts.append(np.fromiter(extra.values(), np.float32, len(extra)))
                    owner.append(np.full(len(extra), n))
        return np.concatenate(cols), np.concatenate(counts), np.concatenate(owner)

    def neighbours(self, sources: Sequence[int], n: int, among: np.ndarray | None = None,
                   less: tuple[int, float] | None = None) -> np.ndarray:
        """Up to n rows most co-clicked with `sources` (summed counts), best first, ties to the
        lower row (of rows tied at the n-th place, which ones make the list is argpartition's
        pick), only rows r with among[r] true when `among` (bool by row) is given. `less`
        (row, count): that row's sum taken down by count (the pairs one click added)."""
        if n <= 0 or not len(sources):
            return np.zeros(0, np.int64)
        # every source's row in one gather; the counts are whole numbers, so their float64 sums
        # do not depend on the order they come in
        cols, counts, _ = self._gather(np.asarray(sources, np.int64))
        uniq, inverse = sorted_unique(cols, return_inverse=True)
        total = np.bincount(inverse, weights=counts, minlength=len(uniq))
        if less is not None:
            at = np.searchsorted(uniq, less[0])
            if at < len(uniq) and uniq[at] == less[0]:
                total[at] -= less[1]
            keep = total > 0
            uniq, total = uniq[keep], total[keep]
        if among is not None:
            keep = (uniq < len(among)) & among[np.minimum(uniq, len(among) - 1)]
            uniq, total = uniq[keep], total[keep]
        if len(uniq) > n:
            keep = np.argpartition(-total, n - 1)[:n]
            uniq, total = uniq[keep], total[keep]
        return uniq[np.lexsort((uniq, -total))]

"""Lexical item vectors: hashed TF-IDF over the cleaned item text, for the words a dense model blurs.

On product text a brand, a model number or a cartridge code says more about who buys an item than
its dense sentence vector does (TF-IDF profiles beat every dense method there). Each item keeps its
hashed term counts; IDF comes from the live catalog's document frequencies, kept up to date as
items come and go, and is applied when rows are read, so an item added a second ago is weighted
like every other. Nothing is stored on disk: the rows are rebuilt from the catalog's text on open.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable

import numpy as np

from ..text.catalog import clean_text
from ..vectors import find_sorted, grown, slices, sorted_unique

#: Hash buckets for terms: collisions stay rare for catalogs' vocabularies (usually < 10^6 words).
BUCKETS = 1 << 20
#: Terms read per item: the start of a long seller text carries its brand and kind; the rest is
#: mostly boilerplate, and the cap bounds memory per item.
MAX_TERMS = 300
#: The term pools are compacted when more than this many entries (and half of them) are garbage.
COMPACT_MIN = 1 << 16
_TOKEN = re.compile(r"\b\w\w+\b")


def term_counts(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted hashed term ids int64, sublinear term frequencies 1 + log(tf) float32) of `text`."""
    words = _TOKEN.findall(clean_text(text).lower())[:MAX_TERMS]
    if not words:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    ids = np.fromiter((zlib.crc32(w.encode("utf-8", "surrogatepass")) % BUCKETS for w in words),
                      np.int64, len(words))
    uniq, counts = np.unique(ids, return_counts=True)
    return uniq, (1.0 + np.log(counts)).astype(np.float32)


class Lexicon:
    """Hashed term counts by item row, with the catalog's document frequencies.

    Every row's terms live in two flat pools (int32 term ids, float32 term frequencies), a row
    being a slice of them (`_start`, `_len`): reading a few hundred rows is a handful of array
    operations, not one Python step per row, and an item costs 8 bytes a term plus 12, not two
    array objects. Re-indexing a row appends its new slice; the old one is garbage until the pools
    are compacted (when garbage exceeds half of them).
    """

    def __init__(self) -> None:
        self._n = 0
        self._start = np.zeros(0, np.int64)
        self._len = np.zeros(0, np.int32)
        self._terms = np.zeros(0, np.int32)
        self._tf = np.zeros(0, np.float32)
        self._used = 0      # pool entries written
        self._garbage = 0   # of those, entries no row points at
        self._df = np.zeros(BUCKETS, np.int32)
        self._docs = 0

    def __len__(self) -> int:
        return self._n

    def set(self, row: int, text: str) -> None:
        """Index (or re-index) the text of item `row`; rows grow as needed."""
        if row >= self._n:
            self._start, self._len = grown(self._start, row + 1), grown(self._len, row + 1)
            self._n = row + 1
        self.clear(row)
        terms, tf = term_counts(text)
        if len(terms):  # a document without words counts in no frequency (as `clear` assumes)
            self._append(row, terms, tf)
            self._df[terms] += 1
            self._docs += 1

    def _append(self, row: int, terms: np.ndarray, tf: np.ndarray) -> None:
        end = self._used + len(terms)
        self._terms, self._tf = grown(self._terms, end), grown(self._tf, end)
        self._terms[self._used:end], self._tf[self._used:end] = terms, tf
        self._start[row], self._len[row] = self._used, len(terms)
        self._used = end

    def clear(self, row: int) -> None:
        """Forget a row's text (a removed item): it no longer counts in the frequencies."""
        if row < self._n and self._len[row]:
            lo = self._start[row]
            self._df[self._terms[lo:lo + self._len[row]]] -= 1
            self._docs -= 1
            self._garbage += int(self._len[row])
            self._len[row] = 0
            if self._garbage > max(COMPACT_MIN, self._used // 2):
                self._compact()

    def _compact(self) -> None:
        """Rewrite the pools with only the slices rows point at (same rows, same terms)."""
        rows = np.arange(self._n)
        indptr, pick = self._slices(rows)
        self._terms, self._tf = self._terms[pick], self._tf[pick]
        self._start[: self._n], self._used, self._garbage = indptr[:-1], len(pick), 0

    def rebuild(self, texts: Iterable[str], removed: np.ndarray) -> None:
        """Index every row from scratch (on open); removed rows stay empty."""
        self.__init__()
        parts = [term_counts("" if removed[row] else text) for row, text in enumerate(texts)]
        self._n = len(parts)
        self._len = np.fromiter((len(t) for t, _ in parts), np.int32, len(parts))
        self._start = np.zeros(len(parts), np.int64)
        self._start[1:] = np.cumsum(self._len[:-1], dtype=np.int64)
        self._terms = np.concatenate([t for t, _ in parts]).astype(np.int32) if parts else self._terms
        self._tf = np.concatenate([f for _, f in parts]).astype(np.float32) if parts else self._tf
        self._used = len(self._terms)
        self._df = np.bincount(self._terms, minlength=BUCKETS).astype(np.int32)
        self._docs = int((self._len > 0).sum())

    def _idf(self, terms: np.ndarray) -> np.ndarray:
        n = max(self._docs, 1)
        return (np.log((1.0 + n) / (1.0 + self._df[terms])) + 1.0).astype(np.float32)

    def _slices(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(indptr, pool positions) of `rows`' slices, in order; rows beyond the table are empty."""
        rows = np.asarray(rows, np.int64)
        if len(rows) and rows.max() < self._n:  # (a request's rows: all indexed)
            return slices(self._start[rows], self._len[rows])
        inside = rows < self._n
        lens = np.where(inside, self._len[np.where(inside, rows, 0)] if self._n else 0, 0).astype(np.int64)
        starts = self._start[np.where(inside, rows, 0)] if self._n else np.zeros(len(rows), np.int64)
        return slices(starts, lens)

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """TF-IDF rows, L2-normalised, as CSR parts (indptr, term ids, float32 weights)."""
        indptr, pick = self._slices(rows)
        idx = self._terms[pick]
        val = self._tf[pick] * self._idf(idx)
        norms = np.sqrt(_segment_sums(val * val, indptr))
        val = val * np.repeat(1.0 / np.maximum(norms, 1e-12), np.diff(indptr)).astype(np.float32)
        return indptr, idx, val

    def similarity(self, history: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Cosine between each of `rows` and the mean TF-IDF vector of `history`: shape (len(rows),)."""
        out = np.zeros(len(rows), np.float32)
        if not len(history) or not len(rows):
            return out
        # the history's rows and the candidates' in one pass (each row is normalised alone)
        both, cut = np.concatenate([np.asarray(history, np.int64), np.asarray(rows, np.int64)]), len(history)
        indptr, idx, val = self.rows(both)
        split = indptr[cut]
        terms, inverse = sorted_unique(idx[:split], return_inverse=True)
        weights = np.bincount(inverse, weights=val[:split], minlength=len(terms))
        norm = float(np.linalg.norm(weights))
        if norm == 0.0:
            return out
        indptr, idx, val = indptr[cut:] - split, idx[split:], val[split:]
        pos, hit = find_sorted(terms, idx)
        contrib = np.where(hit, val * weights[pos] / norm, 0.0)
        return _segment_sums(contrib, indptr)


def _segment_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Sum of values[indptr[i]:indptr[i+1]] for each i (empty segments give 0)."""
    c = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    return (c[indptr[1:]] - c[indptr[:-1]]).astype(np.float32)

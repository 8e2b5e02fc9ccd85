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

#: Hash buckets for terms: collisions stay rare for catalogs' vocabularies (usually < 10^6 words).
BUCKETS = 1 << 20
#: Terms read per item: the start of a long seller text carries its brand and kind; the rest is
#: mostly boilerplate, and the cap bounds memory per item.
MAX_TERMS = 300
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
    """Hashed term counts by item row, with the catalog's document frequencies."""

    def __init__(self) -> None:
        self._terms: list[np.ndarray] = []
        self._tf: list[np.ndarray] = []
        self._df = np.zeros(BUCKETS, np.int32)
        self._docs = 0

    def __len__(self) -> int:
        return len(self._terms)

    def set(self, row: int, text: str) -> None:
        """Index (or re-index) the text of item `row`; rows grow as needed."""
        while len(self._terms) <= row:
            self._terms.append(np.zeros(0, np.int64))
            self._tf.append(np.zeros(0, np.float32))
        self.clear(row)
        terms, tf = term_counts(text)
        self._terms[row], self._tf[row] = terms, tf
        if len(terms):  # a document without words counts in no frequency (as `clear` assumes)
            self._df[terms] += 1
            self._docs += 1

    def clear(self, row: int) -> None:
        """Forget a row's text (a removed item): it no longer counts in the frequencies."""
        if row < len(self._terms) and len(self._terms[row]):
            self._df[self._terms[row]] -= 1
            self._docs -= 1
            self._terms[row] = np.zeros(0, np.int64)
            self._tf[row] = np.zeros(0, np.float32)

    def rebuild(self, texts: Iterable[str], removed: np.ndarray) -> None:
        """Index every row from scratch (on open); removed rows stay empty."""
        self.__init__()
        for row, text in enumerate(texts):
            self.set(row, "" if removed[row] else text)

    def _idf(self, terms: np.ndarray) -> np.ndarray:
        n = max(self._docs, 1)
        return (np.log((1.0 + n) / (1.0 + self._df[terms])) + 1.0).astype(np.float32)

    def rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """TF-IDF rows, L2-normalised, as CSR parts (indptr, term ids, float32 weights)."""
        empty_t, empty_v = np.zeros(0, np.int64), np.zeros(0, np.float32)
        n, all_terms, all_tf = len(self._terms), self._terms, self._tf
        picked = np.asarray(rows, np.int64).tolist()  # Python ints index lists several times faster
        terms = [all_terms[r] if r < n else empty_t for r in picked]
        tfs = [all_tf[r] if r < n else empty_v for r in picked]
        indptr = np.zeros(len(picked) + 1, np.int64)
        indptr[1:] = np.cumsum(np.fromiter(map(len, terms), np.int64, len(terms)))
        idx = np.concatenate(terms) if terms else empty_t
        val = (np.concatenate(tfs) if tfs else empty_v) * self._idf(idx)
        norms = np.sqrt(_segment_sums(val * val, indptr))
        val = val * np.repeat(1.0 / np.maximum(norms, 1e-12), np.diff(indptr)).astype(np.float32)
        return indptr, idx, val

    def similarity(self, history: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Cosine between each of `rows` and the mean TF-IDF vector of `history`: shape (len(rows),)."""
        out = np.zeros(len(rows), np.float32)
        if not len(history) or not len(rows):
            return out
        _, h_idx, h_val = self.rows(np.asarray(history, np.int64))
        terms, inverse = np.unique(h_idx, return_inverse=True)
        weights = np.bincount(inverse, weights=h_val, minlength=len(terms))
        norm = float(np.linalg.norm(weights))
        if norm == 0.0:
            return out
        indptr, idx, val = self.rows(np.asarray(rows, np.int64))
        pos = np.searchsorted(terms, idx).clip(max=len(terms) - 1)
        hit = terms[pos] == idx
        contrib = np.where(hit, val * weights[pos] / norm, 0.0)
        return _segment_sums(contrib, indptr)


def _segment_sums(values: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Sum of values[indptr[i]:indptr[i+1]] for each i (empty segments give 0)."""
    c = np.concatenate([[0.0], np.cumsum(values, dtype=np.float64)])
    return (c[indptr[1:]] - c[indptr[:-1]]).astype(np.float32)

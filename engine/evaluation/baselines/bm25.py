"""BM25 text retrieval: the user's query is the words of the items they liked (and their profile)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.sparse import csr_matrix, diags

from .base import Query, ScoringMethod, TrainSet, history_matrix
from .content import item_document


def bm25_weights(counts: csr_matrix, k1: float = 1.2, b: float = 0.75) -> csr_matrix:
    """Okapi BM25 weight of each (document, term): idf(t) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl)).

    Args:
        counts: term counts tf, shape (n_docs, n_terms).
        k1, b: the usual saturation and length-normalisation constants.

    Returns:
        Weights, shape (n_docs, n_terms), float64, with idf(t) = log(1 + (N - df + 0.5) / (df + 0.5)).
    """
    tf = csr_matrix(counts, dtype=np.float64, copy=True)
    n_docs = tf.shape[0]
    df = np.bincount(tf.indices, minlength=tf.shape[1])
    idf = np.log1p((n_docs - df + 0.5) / (df + 0.5))
    length = np.asarray(tf.sum(axis=1)).ravel()
    avgdl = length.mean() if n_docs and length.mean() > 0 else 1.0
    norm = k1 * (1.0 - b + b * length / avgdl)  # per document
    rows = np.repeat(np.arange(n_docs), np.diff(tf.indptr))
    tf.data = tf.data * (k1 + 1.0) / (tf.data + norm[rows])
    return tf @ diags(idf)


class BM25Method(ScoringMethod):
    """BM25 over the item documents (title, text, category tokens); the query is the summed term
    counts of the user's history documents plus their profile text, and score(d) = sum over terms t
    of query_t * w(t, d).

    Stop words are dropped by default: summed over a whole history, a common word's counts would
    outweigh its low idf.
    """

    name = "bm25"

    def __init__(self, seed: int = 0, k1: float = 1.2, b: float = 0.75,
                 stop_words: str | None = "english", min_df: int = 1) -> None:
        super().__init__(seed)
        if k1 < 0 or not 0.0 <= b <= 1.0:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1; got k1={k1}, b={b}")
        self.k1, self.b = k1, b
        self.stop_words, self.min_df = stop_words, min_df

    def _fit(self, train: TrainSet) -> None:
        from sklearn.feature_extraction.text import CountVectorizer

        self._vectorizer = CountVectorizer(stop_words=self.stop_words, min_df=self.min_df,
                                           dtype=np.float64)
        self._counts = csr_matrix(self._vectorizer.fit_transform([item_document(it) for it in train.items]))
        self._weights_t = bm25_weights(self._counts, self.k1, self.b).T.tocsr()

    def queries(self, queries: Sequence[Query]) -> csr_matrix:
        """Term counts per query, shape (len(queries), n_terms): history documents plus profile."""
        history = history_matrix(queries, self._counts.shape[0]) @ self._counts
        profiles = self._vectorizer.transform([q.profile or "" for q in queries])
        return csr_matrix(history + profiles)

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        return (self.queries(queries) @ self._weights_t).toarray()

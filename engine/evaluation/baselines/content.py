"""Content profiles: a user is the mean vector of the items they liked, items rank by cosine to it."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.sparse import csr_matrix
from sklearn.preprocessing import normalize

from engine.text.catalog import clean_text, item_text
from engine.types import Item

from .base import Query, ScoringMethod, TrainSet, history_matrix

Encode = Callable[[list[str]], np.ndarray]


def item_document(item: Item) -> str:
    """Title, text (both cleaned of markup) and one token per category ("cat_Sci_Fi"), for
    bag-of-words models: a category stays one symbol instead of splitting into common words."""
    cats = ("cat_" + "".join(ch if ch.isalnum() else "_" for ch in c) for c in item.categories)
    return " ".join([clean_text(item.title), clean_text(item.text), *cats])


def _profile_scores(queries: Sequence[Query], item_vectors, profile_vectors) -> np.ndarray:
    """Cosine between every item and the mean of the query's history vectors (and profile vector).

    `item_vectors` has L2-normalised rows, shape (n_items, d), dense or sparse; `profile_vectors`
    holds one row per query (zeros where the query has no profile).
    """
    sums = history_matrix(queries, item_vectors.shape[0]) @ item_vectors
    users = normalize(sums + profile_vectors)
    scores = users @ item_vectors.T
    return scores.toarray() if hasattr(scores, "toarray") else np.asarray(scores)


class TfidfProfileMethod(ScoringMethod):
    """TF-IDF over the item document (scikit-learn); score = cosine between an item and the mean TF-IDF
    vector of the user's positives (plus their profile text when they have one)."""

    name = "tfidf"

    def __init__(self, seed: int = 0, min_df: int = 1, stop_words: str | None = None) -> None:
        super().__init__(seed)
        self.min_df = min_df
        self.stop_words = stop_words

    def _fit(self, train: TrainSet) -> None:
        from sklearn.feature_extraction.text import TfidfVectorizer

        self._vectorizer = TfidfVectorizer(min_df=self.min_df, sublinear_tf=True,
                                           stop_words=self.stop_words, dtype=np.float32)
        docs = [item_document(it) for it in train.items]
        self._items = csr_matrix(self._vectorizer.fit_transform(docs))

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        texts = [q.profile or "" for q in queries]
        return _profile_scores(queries, self._items, self._vectorizer.transform(texts))


class LMProfileMethod(ScoringMethod):
    """The naive language-model profile: cosine between an item's raw text vector and the mean of
    the vectors of the user's positives (plus their profile text's vector when they have one)."""

    name = "lm-profile"

    def __init__(self, encode: Encode, seed: int = 0) -> None:
        super().__init__(seed)
        self._encode = encode

    def _fit(self, train: TrainSet) -> None:
        self._items = np.asarray(self._encode([item_text(it) for it in train.items]), dtype=np.float32)

    def scores(self, queries: Sequence[Query]) -> np.ndarray:
        profiles = np.zeros((len(queries), self._items.shape[1]), dtype=np.float32)
        with_text = [i for i, q in enumerate(queries) if q.profile]
        if with_text:
            profiles[with_text] = self._encode([queries[i].profile for i in with_text])
        return _profile_scores(queries, self._items, profiles)

"""Hashed TF-IDF rows and the per-request feature standardisation of the reranker."""

from __future__ import annotations

import numpy as np
import pytest

from engine.state.coclick import CoClicks
from engine.state.lexical import Lexicon, term_counts
from engine.models.rerank import FEATURES, N_BUCKETS, N_FEATURES, N_INPUTS, column, expand, history_bucket

DOCS = ["HP 74 black ink cartridge", "HP 75 tri-color ink cartridge", "Avery white address labels",
        "Pilot gel pens, blue ink"]


def _manual_tfidf(docs: list[str]) -> list[dict[str, float]]:
    """Sublinear TF, smoothed IDF, L2 rows, computed by hand from the words."""
    import math
    import re

    words = [re.findall(r"\b\w\w+\b", d.lower()) for d in docs]
    df: dict[str, int] = {}
    for w in words:
        for t in set(w):
            df[t] = df.get(t, 0) + 1
    rows = []
    for w in words:
        v = {t: (1 + math.log(w.count(t))) * (math.log((1 + len(docs)) / (1 + df[t])) + 1) for t in set(w)}
        norm = math.sqrt(sum(x * x for x in v.values()))
        rows.append({t: x / norm for t, x in v.items()})
    return rows


def test_similarity_is_the_cosine_to_the_mean_profile():
    lex = Lexicon()
    for row, text in enumerate(DOCS):
        lex.set(row, text)
    manual = _manual_tfidf(DOCS)
    profile: dict[str, float] = {}
    for r in (0, 3):
        for t, x in manual[r].items():
            profile[t] = profile.get(t, 0.0) + x
    norm = np.sqrt(sum(x * x for x in profile.values()))
    want = [sum(x * profile.get(t, 0.0) for t, x in manual[r].items()) / norm for r in range(4)]
    got = lex.similarity(np.array([0, 3]), np.arange(4))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert got[1] > got[2] == 0.0  # shares "hp ink cartridge"; labels share nothing


def test_removed_rows_leave_the_frequencies_and_rebuild_agrees():
    lex = Lexicon()
    for row, text in enumerate(DOCS):
        lex.set(row, text)
    lex.clear(2)
    again = Lexicon()
    again.rebuild(DOCS, np.array([False, False, True, False]))
    np.testing.assert_allclose(lex.similarity(np.array([0]), np.arange(4)),
                               again.similarity(np.array([0]), np.arange(4)), rtol=1e-6)
    assert lex.similarity(np.array([0]), np.array([2]))[0] == 0.0
    assert lex.similarity(np.array([], np.int64), np.arange(4)).tolist() == [0.0] * 4


def test_term_counts_clean_markup_first():
    terms, tf = term_counts("<b>Ink</b> ink &amp; toner")
    plain, tf_plain = term_counts("ink ink toner")
    np.testing.assert_array_equal(terms, plain)
    np.testing.assert_allclose(tf, tf_plain)


def test_coclick_neighbours_rank_by_summed_counts():
    co = CoClicks(window=5)
    co.build([[0, 1, 2], [0, 1], [1, 3], [0, 4]], 5)
    assert co.neighbours([0], 3).tolist() == [1, 2, 4]  # 1 twice, then ties to the lower row
    assert co.neighbours([0, 3], 1).tolist() == [1]     # 1: 2 with item 0 + 1 with item 3
    co.add_click([3], 4)
    assert 4 in co.neighbours([3], 5).tolist()          # the overlay counts too
    np.testing.assert_allclose(co.scores([0, 1], np.array([2]), np.array([2.0, 0.5])), [2.5])


@pytest.mark.parametrize("n, bucket", [(0, 0), (1, 1), (2, 2), (4, 3), (5, 4), (7, 4), (8, 5), (500, 5)])
def test_history_buckets(n, bucket):
    assert history_bucket(n) == bucket


def test_expand_standardises_within_the_request_into_the_users_bucket():
    raw = np.array([[1.0] * N_FEATURES, [3.0] * N_FEATURES], np.float32)
    raw[:, FEATURES.index("fresh")] = 1.0  # constant over the candidates: carries nothing
    x = expand(raw, 3)
    assert x.shape == (2, N_INPUTS)
    b = history_bucket(3)
    assert x[0, column("tower", b)] == pytest.approx(-1.0) and x[1, column("tower", b)] == pytest.approx(1.0)
    assert x[:, column("fresh", b)].tolist() == [0.0, 0.0]
    assert x[:, N_FEATURES * N_BUCKETS + b].tolist() == [1.0, 1.0]
    others = [c for c in range(N_FEATURES * N_BUCKETS) if c // N_FEATURES != b]
    assert not x[:, others].any()
    # scaling a feature on every candidate changes nothing: only the order among them counts
    np.testing.assert_allclose(expand(raw * 10.0, 3), x, atol=1e-6)


def test_rows_match_their_texts_through_sets_clears_and_compaction(monkeypatch):
    """Random re-indexing, clearing and compaction of the flat pools: every row reads back as
    TF-IDF of its current text, weighted by the current document frequencies."""
    from engine.state import lexical

    monkeypatch.setattr(lexical, "COMPACT_MIN", 8)
    rng = np.random.default_rng(0)
    words = ["ink", "toner", "paper", "pen", "blue", "black", "hp", "avery", "label", "stapler"]
    lex, texts, appended = Lexicon(), {}, 0
    for step in range(400):
        row = int(rng.integers(0, 40))
        if rng.random() < 0.25:
            lex.clear(row)
            texts[row] = ""
        else:
            texts[row] = " ".join(rng.choice(words, int(rng.integers(0, 6))))
            lex.set(row, texts[row])
            appended += len(term_counts(texts[row])[0])
    assert lex._used < appended  # compaction ran and dropped the replaced slices
    n = max(texts) + 1
    docs = [term_counts(texts.get(r, "")) for r in range(n)]
    df = np.zeros(lexical.BUCKETS, np.int64)
    for t, _ in docs:
        df[t] += 1
    n_docs = sum(len(t) > 0 for t, _ in docs)
    picked = np.array([3, 0, 39, 3, n + 5, 17])  # repeats and a row beyond the table
    indptr, idx, val = lex.rows(picked)
    for i, r in enumerate(picked):
        t, tf = docs[r] if r < n else (np.zeros(0, np.int64), np.zeros(0, np.float32))
        w = tf * (np.log((1.0 + n_docs) / (1.0 + df[t])) + 1.0)
        w = w / max(np.linalg.norm(w), 1e-12)
        np.testing.assert_array_equal(idx[indptr[i]:indptr[i + 1]], t)
        np.testing.assert_allclose(val[indptr[i]:indptr[i + 1]], w, rtol=1e-5)
    again = Lexicon()
    again.rebuild([texts.get(r, "") for r in range(n)], np.zeros(n, bool))
    np.testing.assert_array_equal(again.similarity(np.array([1, 2]), np.arange(n)),
                                  lex.similarity(np.array([1, 2]), np.arange(n)))

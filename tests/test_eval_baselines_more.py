"""EASE, co-occurrence, BM25 and LightFM's user split on hand-made data with answers worked out here."""

from __future__ import annotations

from math import log

import numpy as np
import pytest

from engine.evaluation.baselines.base import Query, TrainSet
from engine.evaluation.baselines.bm25 import BM25Method, bm25_weights
from engine.evaluation.baselines.cooccurrence import CooccurrenceMethod
from engine.evaluation.baselines.ease import EASEMethod, ease_weights
from engine.evaluation.baselines.hybrid import LightFMMethod, split_history
from engine.evaluation.datasets import EventTable
from engine.evaluation.methods import BASELINES, build_methods
from engine.types import Item


def _train(histories: list[list[int]], n_items: int, titles: list[str] | None = None) -> TrainSet:
    """One positive per (user, item) in list order (timestamps ascending); items titled by `titles`."""
    users = [u for u, h in enumerate(histories) for _ in h]
    items = [i for h in histories for i in h]
    n = len(items)
    events = EventTable(np.array(users, dtype=np.int64), np.array(items, dtype=np.int64),
                        np.arange(n, dtype=np.int64), np.ones(n))
    names = titles or [f"item {i}" for i in range(n_items)]
    catalog = tuple(Item(str(i), names[i]) for i in range(n_items))
    user_ids = np.array([f"u{u}" for u in range(len(histories))], dtype=object)
    return TrainSet(events, catalog, len(histories), user_ids)


def test_split_history_is_disjoint_and_complete(rng: np.random.Generator) -> None:
    from scipy.sparse import csr_matrix

    dense = (rng.random((30, 40)) < 0.2).astype(np.float32)
    dense[0], dense[1] = 0, 0
    dense[1, 5] = 1  # a user with one positive; user 0 has none
    m = csr_matrix(dense)
    features, targets = split_history(m, np.random.default_rng(0))
    assert features.multiply(targets).nnz == 0
    assert (features + targets != m).nnz == 0
    n = np.diff(m.indptr)
    assert (np.diff(features.indptr) == n // 2).all() and (np.diff(targets.indptr) == n - n // 2).all()
    assert features[1].nnz == 0 and targets[1, 5] == 1
    again, _ = split_history(m, np.random.default_rng(0))
    other, _ = split_history(m, np.random.default_rng(1))
    assert (again != features).nnz == 0 and (other != features).nnz > 0


def test_lightfm_trains_no_user_on_an_item_in_its_features(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightfm import LightFM

    seen = {}
    fit = LightFM.fit

    def spy(self, interactions, **kwargs):
        seen["interactions"], seen["users"] = interactions.tocsr(), kwargs["user_features"].tocsr()
        return fit(self, interactions, **kwargs)

    monkeypatch.setattr(LightFM, "fit", spy)
    histories = [[0, 1, 2, 3], [1, 2, 4], [2, 5], [3], [0, 4, 5, 1, 2]]
    LightFMMethod(user_features="history", epochs=1, no_components=4).fit(_train(histories, 6))
    interactions, users = seen["interactions"], seen["users"]
    for u, history in enumerate(histories):
        trained, featured = set(interactions[u].indices), set(users[u].indices)
        assert not trained & featured, (u, trained, featured)
        assert trained | featured == set(history) and len(featured) == len(history) // 2


def _q(*history: int, profile: str | None = None) -> Query:
    return Query(-1, np.array(history, dtype=np.int64), profile)


# 4 users, 5 items; item 4 has no positive.
TINY = [[0, 1], [0, 1, 2], [1, 2], [3]]


def test_ease_with_a_fixed_lambda_is_the_closed_form() -> None:
    lam = 2.0
    x = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=np.float64)  # TINY
    p = np.linalg.inv(x.T @ x + lam * np.eye(4))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    method = EASEMethod(lambdas=(lam,))
    method.fit(_train(TINY, 5))
    assert method.lam == lam and method.validation == {}
    got = method.scores([_q(0), _q(1, 2), _q()])
    expected = np.vstack([b[0], b[1] + b[2], np.zeros(4)])
    np.testing.assert_allclose(got[:, :4], expected, atol=1e-6)
    assert not got[:, 4].any(), "an item without a training positive scores 0"
    np.testing.assert_allclose(ease_weights(x.T @ x, lam), b, atol=1e-6)


def test_ease_weights_fall_back_to_float64_and_reject_what_is_not_positive_definite() -> None:
    # eigenvalues 2e8 + 1e-3 and 1e-3: float32 cannot factor it, float64 can
    gram = np.array([[1e8, 1e8], [1e8, 1e8]])
    b = ease_weights(gram, 1e-3)
    np.testing.assert_allclose(b, [[0.0, 1.0], [1.0, 0.0]], atol=1e-4)
    with pytest.raises(ValueError, match="positive definite"):
        ease_weights(np.array([[-5.0, 0.0], [0.0, 1.0]]), 1.0)


def _lambda_world() -> tuple[list[list[int]], int, int, list[int], list[int]]:
    """Z=0 and X=1 always together; pairs (A_b, T_b). Per b, three users liked [A_b, T_b]; four
    users liked [Z, X, A_0 .. A_5]. So X co-occurs with every A_b four times and T_b three times."""
    z, x, blocks = 0, 1, 6
    a = [2 + 2 * b for b in range(blocks)]
    t = [3 + 2 * b for b in range(blocks)]
    histories = [[a[b], t[b]] for b in range(blocks) for _ in range(3)] + [[z, x, *a]] * 4
    return histories, z, x, a, t


def test_ease_picks_the_lambda_that_wins_on_held_out_users() -> None:
    """A huge lam makes B ~ G / lam, i.e. co-occurrence counts: from A_b it ranks X, Z and the other
    A's (4 each) over T_b (3).
    A small lam regresses: X is explained by Z, so A_b predicts T_b. A held-out [A_b, T_b] user
    shows A_b and hides T_b, so the small lam is right; a held-out [Z, X, A...] user is a hit either
    way. With ties going to the larger lam, only a strict win picks the small one."""
    histories, z, x, a, t = _lambda_world()
    train = _train(histories, 2 + 2 * len(a))
    for grid in [(1.0, 1e4), (1e4, 1.0)]:
        method = EASEMethod(seed=0, lambdas=grid, k=1)
        method.fit(train)
        assert method.lam == 1.0, method.validation
        assert method.validation[1.0] > method.validation[1e4], method.validation
    assert method.recommend([_q(a[0])], 1)[0].tolist() == [t[0]]
    cooc_like = EASEMethod(lambdas=(1e4,))
    cooc_like.fit(train)
    scores = cooc_like.scores([_q(a[0])])[0]
    assert min(scores[z], scores[x], scores[a[1]]) > scores[t[0]] > 0


def test_ease_without_users_to_hold_out_takes_the_middle_of_the_grid() -> None:
    method = EASEMethod(lambdas=(300.0, 10.0, 30.0))
    method.fit(_train([[0, 1], [2]], 3))  # one eligible user: 10% of it rounds to nobody
    assert method.lam == 30.0 and method.validation == {}


@pytest.mark.parametrize("kwargs, rule", [({"lambdas": ()}, "lambdas"), ({"lambdas": (10.0, -1.0)}, "lambdas"),
                                          ({"holdout": 1.0}, "holdout"), ({"k": 0}, "k must")])
def test_ease_rejects_bad_settings(kwargs: dict, rule: str) -> None:
    with pytest.raises(ValueError, match=rule):
        EASEMethod(**kwargs)


def test_cooc_scores_are_log_counts_plus_log_popularity() -> None:
    # popularity 2, 3, 2, 1, 0; users who liked both: C01 = 2, C02 = 1, C12 = 2, item 3 with nobody
    method = CooccurrenceMethod()
    method.fit(_train(TINY, 5))
    got = method.scores([_q(0), _q(0, 2), _q()])
    expected = [[log(3), log(3) + log(4), log(2) + log(3), log(2), 0.0],
                [log(2) + log(3), log(5) + log(4), log(2) + log(3), log(2), 0.0],
                [log(3), log(4), log(3), log(2), 0.0]]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert method.recommend([_q(0, 2)], 3)[0].tolist() == [1, 3, 4]
    assert method.recommend([_q()], 2)[0][0] == 1, "no history: the most popular item"


# Three short documents: N = 3, lengths 2, 3, 4 (avgdl 3); df apple 2, banana 2, cherry 2, date 1.
DOCS = ["apple banana", "apple apple cherry", "banana cherry cherry date"]


def _bm25(tf: float, length: int, df: int, k1: float = 1.2, b: float = 0.75) -> float:
    idf = log(1 + (3 - df + 0.5) / (df + 0.5))
    return idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * length / 3))


def test_bm25_weights_follow_the_formula() -> None:
    counts = np.array([[1, 1, 0, 0], [2, 0, 1, 0], [0, 1, 2, 1]], dtype=np.float64)  # apple banana cherry date
    got = bm25_weights(counts).toarray()
    expected = [[_bm25(1, 2, 2), _bm25(1, 2, 2), 0, 0], [_bm25(2, 3, 2), 0, _bm25(1, 3, 2), 0],
                [0, _bm25(1, 4, 2), _bm25(2, 4, 2), _bm25(1, 4, 1)]]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


def test_bm25_ranks_by_the_words_of_the_history_and_profile() -> None:
    method = BM25Method(stop_words=None)
    method.fit(_train([[0], [1], [2]], 3, DOCS))
    # history doc 0 = {apple: 1, banana: 1}: doc 1 through apple (tf 2), doc 2 through banana (tf 1)
    got = method.scores([_q(0), _q(profile="cherry"), _q(1, profile="date")])
    np.testing.assert_allclose(got[0], [2 * _bm25(1, 2, 2), _bm25(2, 3, 2), _bm25(1, 4, 2)], rtol=1e-9)
    assert method.recommend([_q(0)], 2)[0].tolist() == [1, 2]
    # "cherry" once in 3 words vs twice in 4: tf saturates, the longer document still wins
    assert method.recommend([_q(profile="cherry")], 3)[0].tolist()[:2] == [2, 1]
    assert got[1][0] == 0.0 and got[1][2] > got[1][1] > 0
    # query {apple: 2, cherry: 1} from doc 1, plus "date" from the profile
    np.testing.assert_allclose(got[2][2], _bm25(2, 4, 2) + _bm25(1, 4, 1), rtol=1e-9)
    np.testing.assert_allclose(got[2][0], 2 * _bm25(1, 2, 2), rtol=1e-9)


def test_bm25_drops_english_stop_words_by_default() -> None:
    method = BM25Method()
    method.fit(_train([[0], [1], [2]], 3, ["the apple", "the banana", "the cherry"]))
    assert not method.scores([_q(0)])[0][1:].any(), "'the' joins no documents"


@pytest.mark.parametrize("protocol", ["item-cold", "user-cold"])
def test_new_baselines_are_registered(protocol: str) -> None:
    names = ["cooc", "bm25", "ease"]
    assert set(names) <= set(BASELINES)
    built = build_methods(names, protocol, 0, lambda: None, None)
    assert [m.name for m in built] == names

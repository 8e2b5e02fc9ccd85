"""`diversity`: maximal marginal relevance over the scored candidates; 0 keeps today's order."""

from __future__ import annotations

import numpy as np
import pytest

from engine import InvalidInputError
from engine.serving.diversity import mmr


def topics(recs) -> list[str]:
    return [r.item_id.split("-")[0] for r in recs]


def test_mmr_known_answer():
    scores = np.array([0.5, 1.0, 0.99], np.float32)
    vecs = np.array([[0, 1], [1, 0], [1, 0]], np.float32)  # the two best are the same item twice
    assert mmr(scores, vecs, 3, 0.0).tolist() == [1, 2, 0]
    assert mmr(scores, vecs, 3, 0.5).tolist() == [1, 0, 2]
    assert mmr(scores, vecs, 2, 1.0).tolist() == [1, 0]
    assert mmr(scores[:0], vecs[:0], 3, 0.5).tolist() == []


def test_zero_keeps_the_list_exactly(engine):
    engine.recommend("p", k=1, profile="rocket launch orbit moon")
    engine.record("c", "food-0", "click")
    engine.record("c", "ball-2", "skip")
    for user in ("p", "c", "cold"):
        plain = engine.recommend(user, k=12)
        assert engine.recommend(user, k=12, diversity=0) == plain
        assert engine.recommend(user, k=12, diversity=0.0) == plain


def test_diversity_spreads_the_list_and_keeps_scores(engine):
    engine.recommend("p", k=1, profile="rocket launch orbit moon galaxy stars space station")
    plain = engine.recommend("p", k=3)
    assert set(topics(plain)) == {"space"}
    mixed = engine.recommend("p", k=3, diversity=0.9)
    assert mixed[0] == plain[0] and len(set(topics(mixed))) > 1
    scores = {r.item_id: r.score for r in engine.recommend("p", k=12)}
    assert all(scores[r.item_id] == r.score for r in mixed)  # reordered, not rescored


def test_batch_with_diversity_equals_single_calls(engine):
    engine.record("a", "food-0", "click")
    engine.record("b", "ball-1", "click")
    assert engine.recommend_many(["a", "b"], k=5, diversity=0.5) == \
        [engine.recommend(u, k=5, diversity=0.5) for u in ("a", "b")]


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), "0.5", True, None])
def test_bad_diversity_names_the_rule(engine, bad):
    with pytest.raises(InvalidInputError, match="diversity must be a number between 0 and 1"):
        engine.recommend("u", k=3, diversity=bad)
    with pytest.raises(InvalidInputError, match="diversity must be a number between 0 and 1"):
        engine.recommend_many(["u"], k=3, diversity=bad)

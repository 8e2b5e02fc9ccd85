"""The `dislike` event: the item is hidden from that user for good and the user moves away from it."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Config, Engine, Filter
from engine.storage.eventlog import read_log

from conftest import small_catalog


def ids(recs) -> list[str]:
    return [r.item_id for r in recs]


def cosine_to(eng: Engine, user_id: str, item_id: str) -> float:
    st = eng._core.state
    row = st.items.vocab.row(item_id)
    return float(st.users.get(user_id).vector @ st.ranker.space.item_vectors(np.array([row]))[0])


def test_a_disliked_item_is_hidden_from_every_read(engine):
    engine.recommend("u", k=1, profile="rocket launch orbit moon")
    assert "space-0" in ids(engine.recommend("u", k=3))
    engine.record("u", "space-0", "dislike")
    assert "space-0" not in ids(engine.recommend("u", k=12))
    assert "space-0" not in ids(engine.recommend("u", k=12, exclude_seen=False))
    assert "space-0" not in ids(engine.recommend("u", k=12, candidates=["space-0", "space-1"]))
    assert "space-0" not in ids(engine.recommend("u", k=12, filter=Filter(allow=["space-0", "food-0"])))
    assert all("space-0" not in ids(r) for r in engine.recommend_many(["u", "u"], k=12, exclude_seen=False))
    assert "space-0" in ids(engine.recommend("other", k=12))  # only that user's list


def test_a_dislike_pushes_harder_than_a_skip(engine):
    for user in ("skipper", "hater"):
        engine.record(user, "space-1", "click")
        engine.record(user, "space-2", "click")
    before = cosine_to(engine, "hater", "space-0")
    engine.record("skipper", "space-0", "skip")
    engine.record("hater", "space-0", "dislike")
    assert cosine_to(engine, "hater", "space-0") < cosine_to(engine, "skipper", "space-0") < before
    st = engine._core.state
    assert st.items.skips[st.items.vocab.row("space-0")] == 2.0  # each counted as a skip
    assert engine.stats()["events"] == 6


@pytest.mark.parametrize("save", [False, True])
def test_dislike_survives_reopen_and_replay(tmp_path, fake_encoder, save):
    eng = Engine.create(tmp_path / "s", encoder=fake_encoder)
    eng.add_items(small_catalog())
    eng.record("u", "food-1", "click")
    eng.record("u", "food-0", "dislike")
    vec, recs = eng._core.state.users.get("u").vector.copy(), eng.recommend("u", k=11, exclude_seen=False)
    if not save:
        payloads = [p for _, p in read_log(eng.path / eng._core.manifest["log"], first_seq=0)]
        assert {"op": "event", "u": "u", "i": "food-0", "e": "dislike"}.items() <= payloads[-1].items()
    eng.close(save=save)
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as again:
        assert np.array_equal(again._core.state.users.get("u").vector, vec)
        assert again.recommend("u", k=11, exclude_seen=False) == recs
        assert "food-0" not in ids(recs)
        assert again._core.state.users.get("u").dislikes == [again._core.state.items.vocab.row("food-0")]


def test_imported_dislikes_take_the_same_path(engine):
    from engine import Event

    engine.record("live", "ball-1", "click")
    engine.record("live", "ball-0", "dislike", timestamp=5)
    engine.import_events([Event("past", "ball-1", "click", timestamp=1), Event("past", "ball-0", "dislike", timestamp=5)])
    users = engine._core.state.users
    assert np.allclose(users.get("past").vector, users.get("live").vector)
    assert "ball-0" not in ids(engine.recommend("past", k=12, exclude_seen=False))


def test_rederive_keeps_the_dislike(engine):
    engine.record("u", "ball-1", "click")
    engine.record("u", "ball-0", "dislike")
    user = engine._core.state.users.get("u")
    vec = user.vector.copy()
    engine._core.state.rederive(user)
    assert np.allclose(user.vector, vec, atol=1e-6)


def test_dislike_step_is_checked():
    with pytest.raises(ValueError, match="dislike_step must lie in"):
        Config(dislike_step=1.5)

"""The library facade, on the fake encoder: every public call, its effects and its input checks."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from engine import (
    Engine, EngineError, InvalidInputError, Item, Recommendation, StoreError, UnknownItemError,
    UnknownUserError,
)

from conftest import FakeEncoder, small_catalog


def ids(recs: list[Recommendation]) -> list[str]:
    return [r.item_id for r in recs]


def topics(recs: list[Recommendation]) -> set[str]:
    return {r.item_id.split("-")[0] for r in recs}


# ---- items --------------------------------------------------------------------------------------

def test_added_item_is_recommendable_at_once(engine):
    engine.recommend("u", k=1, profile="telescope galaxy stars")
    assert "space-new" not in ids(engine.recommend("u", k=12))
    n = engine.add_items([Item("space-new", "Comet", "telescope galaxy stars comet", ("space",))])
    assert n == 1 and "space-new" in engine
    assert ids(engine.recommend("u", k=1)) == ["space-new"]
    assert ids(engine.similar_items("space-new", k=1)) == ["space-3"]
    assert engine.get_item("space-new").title == "Comet"


def test_removed_item_is_gone_at_once(engine):
    engine.recommend("u", k=1, profile="pasta recipe tomato sauce")
    assert ids(engine.recommend("u", k=1)) == ["food-0"]
    assert engine.remove_items(["food-0"]) == 1
    assert "food-0" not in engine
    assert "food-0" not in ids(engine.recommend("u", k=12))
    assert "food-0" not in ids(engine.similar_items("food-1", k=11))
    assert "food-0" not in ids(engine.recommend("u", k=12, candidates=["food-0", "food-1"]))
    with pytest.raises(UnknownItemError):
        engine.get_item("food-0")
    with pytest.raises(UnknownItemError):
        engine.similar_items("food-0")


def test_remove_with_an_unknown_id_removes_nothing(engine):
    with pytest.raises(UnknownItemError, match="'nope'.*nothing removed"):
        engine.remove_items(["space-0", "nope"])
    assert "space-0" in engine
    with pytest.raises(KeyError):  # the error refines the builtin a caller expects
        engine.remove_items(["nope"])


def test_adding_a_live_id_again_needs_upsert(engine):
    with pytest.raises(InvalidInputError, match="already in the store"):
        engine.add_items([Item("food-0", "Food again")])
    assert engine.get_item("food-0").title == "Food 0"
    engine.add_items([Item("food-0", "Food again", "pasta")], upsert=True)
    assert engine.get_item("food-0").title == "Food again"
    assert engine.stats()["live_items"] == 12


def test_removed_id_can_come_back(engine):
    engine.remove_items(["ball-0"])
    engine.add_items([Item("ball-0", "Ball is back", "football goal")])
    assert engine.get_item("ball-0").title == "Ball is back"
    assert engine.stats()["live_items"] == 12 and engine.stats()["items"] == 12


def test_batch_and_single_adds_agree(tmp_path, catalog):
    batch = Engine.create(tmp_path / "a", encoder=FakeEncoder())
    single = Engine.create(tmp_path / "b", encoder=FakeEncoder())
    batch.add_items(catalog)
    for item in catalog:
        single.add_items([item])
    try:
        for eng in (batch, single):
            eng.recommend("u", k=1, profile="oven baking recipe")
            eng.record("u", "ball-1", "click")
        assert [(r.item_id, round(r.score, 6)) for r in batch.recommend("u", k=8)] == \
               [(r.item_id, round(r.score, 6)) for r in single.recommend("u", k=8)]
        for item in catalog[:4]:
            assert ids(batch.similar_items(item.item_id, k=5)) == ids(single.similar_items(item.item_id, k=5))
    finally:
        batch.close(save=False)
        single.close(save=False)


def test_batch_and_single_removes_agree(tmp_path, catalog):
    a = Engine.create(tmp_path / "a", encoder=FakeEncoder())
    b = Engine.create(tmp_path / "b", encoder=FakeEncoder())
    for eng in (a, b):
        eng.add_items(catalog)
    a.remove_items(["space-0", "food-2", "ball-3"])
    for i in ("space-0", "food-2", "ball-3"):
        b.remove_items([i])
    try:
        assert ids(a.recommend("x", k=12, profile="goal orbit")) == ids(b.recommend("x", k=12, profile="goal orbit"))
    finally:
        a.close(save=False)
        b.close(save=False)


def test_precomputed_vectors(tmp_path, fake_encoder, catalog):
    vecs = fake_encoder.encode([f"{i.title} {i.text}" for i in catalog]) * 3.0  # normalised on the way in
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        calls = fake_encoder.calls
        eng.add_items(catalog, vectors=vecs.astype(np.float32))
        assert fake_encoder.calls == calls  # the model was not needed
        assert ids(eng.similar_items("ball-0", k=3)) and eng.stats()["live_items"] == 12
        with pytest.raises(InvalidInputError, match="float32"):
            eng.add_items([Item("v1", "V")], vectors=np.ones((1, fake_encoder.dim)))
        with pytest.raises(InvalidInputError, match="2 vectors for 1 items"):
            eng.add_items([Item("v1", "V")], vectors=np.ones((2, fake_encoder.dim), np.float32))
        with pytest.raises(InvalidInputError, match="all zeros"):
            eng.add_items([Item("v1", "V")], vectors=np.zeros((1, fake_encoder.dim), np.float32))
        assert "v1" not in eng


def test_encoder_of_another_width_is_refused(tmp_path, catalog):
    with Engine.create(tmp_path / "s", encoder=FakeEncoder(64)) as eng:
        eng.add_items(catalog)
    with Engine.open(tmp_path / "s", encoder=FakeEncoder(32)) as eng:
        with pytest.raises(InvalidInputError, match="32-d vectors but this store holds 64-d"):
            eng.add_items([Item("x", "X")])
        assert "x" not in eng


# ---- recommend ----------------------------------------------------------------------------------

def test_recommend_with_profile_seeds_and_keeps_the_user(engine):
    recs = engine.recommend("alice", k=4, profile="football league goal")
    assert topics(recs) == {"ball"} and len(recs) == 4
    assert all(isinstance(r, Recommendation) and isinstance(r.score, float) for r in recs)
    assert [r.score for r in recs] == sorted((r.score for r in recs), reverse=True)
    assert topics(engine.recommend("alice", k=4)) == {"ball"}  # the profile was kept
    assert engine.user_history("alice") == []


def test_new_user_without_profile_gets_the_popular_items(engine):
    for n in range(5):
        engine.record(f"fan-{n}", "food-3", "click")
    for n in range(3):
        engine.record(f"fan-{n}", "space-2", "click")
    assert ids(engine.recommend("stranger", k=2)) == ["food-3", "space-2"]


def test_exclude_seen(engine):
    engine.recommend("u", k=1, profile="rocket orbit space moon")
    engine.record("u", "space-0", "click")
    engine.record("u", "space-1", "skip")
    assert not {"space-0", "space-1"} & set(ids(engine.recommend("u", k=12)))
    assert len(engine.recommend("u", k=12)) == 10
    assert "space-0" in ids(engine.recommend("u", k=12, exclude_seen=False))


def test_candidates_are_the_only_ones_ranked(engine):
    engine.recommend("u", k=1, profile="baking oven cake")
    got = engine.recommend("u", k=5, candidates=["ball-0", "food-3", "space-1", "unknown-id"])
    assert set(ids(got)) == {"ball-0", "food-3", "space-1"}
    assert ids(got)[0] == "food-3"
    engine.record("u", "food-3", "click")
    assert "food-3" not in ids(engine.recommend("u", k=5, candidates=["food-3", "ball-0"]))


def test_exclude(engine):
    engine.recommend("u", k=1, profile="football goal")
    got = ids(engine.recommend("u", k=12, exclude=["ball-0", "ball-1", "not-an-item"]))
    assert not {"ball-0", "ball-1"} & set(got) and len(got) == 10


def test_stateless_history_matches_recording_and_changes_nothing(engine):
    for n in range(3):
        engine.record(f"fan-{n}", "ball-1", "click")
    before = engine.stats()
    got = engine.recommend("twin", k=5, history=["space-0", "space-1"])
    assert engine.stats() == before
    with pytest.raises(UnknownUserError):
        engine.user_history("twin")
    assert not {"space-0", "space-1"} & set(ids(got)) and topics(got[:2]) == {"space"}
    engine.record("twin", "space-0", "click")
    engine.record("twin", "space-1", "click")
    assert ids(engine.recommend("twin", k=5)) == ids(got)
    assert "space-0" in ids(engine.recommend("ghost", k=12, history=["space-0"], exclude_seen=False))


def test_stateless_history_rules(engine):
    with pytest.raises(UnknownItemError, match="'nope'"):
        engine.recommend("ghost", k=3, history=["space-0", "nope"])
    with pytest.raises(TypeError, match="sequence of item ids"):
        engine.recommend("ghost", k=3, history="space-0")
    with pytest.raises(InvalidInputError):
        engine.recommend("ghost", k=3, history=[""])
    assert engine.stats()["users"] == 0


def test_k_bounds_the_list(engine):
    assert len(engine.recommend("u", k=3, profile="goal")) == 3
    assert len(engine.recommend("u", k=50)) == 12
    for bad in (0, -1, 10_001, True, 2.5, "3"):
        with pytest.raises(InvalidInputError, match="k must be an integer"):
            engine.recommend("u", k=bad)


def test_recommend_on_an_empty_store(tmp_path, fake_encoder):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        assert eng.recommend("u", k=5) == []
        with pytest.raises(UnknownItemError):
            eng.similar_items("x")


def test_similar_items(engine):
    got = engine.similar_items("space-0", k=3)
    assert topics(got) == {"space"} and "space-0" not in ids(got)
    assert len(engine.similar_items("space-0", k=100)) == 11
    with pytest.raises(UnknownItemError, match="'zzz'"):
        engine.similar_items("zzz")
    with pytest.raises(InvalidInputError):
        engine.similar_items("")


# ---- record -------------------------------------------------------------------------------------

def test_record_learns_and_is_logged(engine):
    pending = engine.stats()["pending_log_records"]
    engine.record("u", "ball-2", "click")
    engine.record("u", "ball-3", "impression", timestamp=1_700_000_000)
    engine.record("u", "food-1", "skip", value=0.5)
    assert engine.user_history("u") == ["ball-2"]
    stats = engine.stats()
    assert stats["pending_log_records"] == pending + 3
    assert stats["events"] == 3 and stats["users"] == 1


@pytest.mark.parametrize("kwargs, error, rule", [
    ({"item_id": "nope"}, UnknownItemError, "unknown item id 'nope'"),
    ({"event": "like"}, InvalidInputError, "event must be one of click, skip, impression"),
    ({"value": float("nan")}, InvalidInputError, "finite number"),
    ({"value": math.inf}, InvalidInputError, "finite number"),
    ({"value": "1"}, InvalidInputError, "finite number"),
    ({"value": True}, InvalidInputError, "finite number"),
    ({"user_id": ""}, InvalidInputError, "user_id must not be empty"),
    ({"user_id": 7}, InvalidInputError, "user_id must be a string"),
    ({"timestamp": 1.5}, InvalidInputError, "timestamp must be an int"),
])
def test_record_validation(engine, kwargs, error, rule):
    args = {"user_id": "u", "item_id": "food-0", "event": "click", "value": 1.0, **kwargs}
    pending = engine.stats()["pending_log_records"]
    with pytest.raises(error, match=rule):
        engine.record(**args)
    assert engine.stats()["pending_log_records"] == pending  # nothing logged
    assert engine.stats()["events"] == 0


def test_record_on_a_removed_item(engine):
    engine.remove_items(["food-0"])
    with pytest.raises(UnknownItemError):
        engine.record("u", "food-0")


def test_user_history_of_unknown_user(engine):
    with pytest.raises(UnknownUserError, match="'ghost'"):
        engine.user_history("ghost")


def test_set_profile_rules(engine):
    with pytest.raises(InvalidInputError, match="profile must be a non-empty string"):
        engine.set_profile("u", "   ")
    engine.set_profile("u", "cake oven")
    assert topics(engine.recommend("u", k=2)) == {"food"}


# ---- lifecycle ----------------------------------------------------------------------------------

def test_context_manager_saves_and_releases(tmp_path, fake_encoder, catalog):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        eng.add_items(catalog)
        eng.record("u", "food-0")
    with pytest.raises(StoreError, match="closed"):
        eng.record("u", "food-1")
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as again:  # the lock was released
        assert again.stats()["pending_log_records"] == 0  # the exit saved a snapshot
        assert again.user_history("u") == ["food-0"]


def test_context_manager_closes_on_error(tmp_path, fake_encoder, catalog):
    with pytest.raises(RuntimeError, match="boom"):
        with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
            eng.add_items(catalog)
            raise RuntimeError("boom")
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as again:
        assert again.stats()["live_items"] == 12


def test_close_twice_is_harmless(tmp_path, fake_encoder):
    eng = Engine.create(tmp_path / "s", encoder=fake_encoder)
    eng.close()
    eng.close()


def test_errors_share_one_base(engine):
    for call in (lambda: engine.record("u", "nope"), lambda: engine.recommend("u", k=0)):
        with pytest.raises(EngineError):
            call()


def test_readers_and_a_writer_in_threads(engine):
    errors: list[BaseException] = []

    def reader():
        try:
            for _ in range(30):
                assert len(engine.recommend("r", k=5)) == 5
                engine.similar_items("ball-0", k=3)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    def writer():
        try:
            for n in range(30):
                engine.record(f"w{n % 3}", small_catalog()[n % 12].item_id, "click")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(3)] + [threading.Thread(target=writer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert engine.stats()["events"] == 30


@pytest.mark.parametrize("history", [False, True])
def test_k_beyond_the_candidate_pool_still_gives_k_items(tmp_path, history):
    """Candidates grow with k: k items whenever k live unseen items exist."""
    from engine import Config

    items = [Item(f"x{n}", f"item {n}", f"word{n % 9} thing{n % 4} part{n % 13}") for n in range(120)]
    eng = Engine.create(tmp_path / "s", Config(retrieve=10, popular_candidates=5, coclick_candidates=5),
                        encoder=FakeEncoder())
    eng.add_items(items)
    eng.remove_items(["x0", "x1"])
    kw = {"history": ["x5", "x6"]} if history else {}
    if not history:
        eng.record("u", "x5")
        eng.record("u", "x6", "skip")
    for k in (11, 50, 116):
        got = ids(eng.recommend("u", k=k, **kw))
        assert len(got) == k == len(set(got)) and not {"x0", "x1", "x5", "x6"} & set(got)
    assert len(eng.recommend("u", k=1000, **kw)) == 116  # all the live unseen items, no more
    assert len(eng.recommend("new", k=60)) == 60  # no vector: the popular prior, topped up
    eng.close(save=False)

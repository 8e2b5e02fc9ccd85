"""The user-vector update rule: toward clicked items, away from skipped ones, smaller steps when warm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.state.users import UserState, UserTable, apply_click, apply_skip, click_step, rederive
from engine.vectors import normalise

DIM = 8


def unit(rng, n=None):
    x = rng.standard_normal((n or 1, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x if n else x[0]


def fresh(vec=None, profile=False) -> UserState:
    u = UserState(vector=np.zeros(DIM, np.float32) if vec is None else vec.copy())
    if profile:
        u.profile, u.profile_vec = "a profile", vec.copy()
    return u


def test_step_shrinks_with_count_and_is_floored():
    u = fresh()
    steps = []
    for n in range(40):
        steps.append(click_step(u, min_step=0.05))
        u.clicks.append(n)
    assert steps[0] == 1.0 and steps[1] == 0.5 and steps[3] == 0.25
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert steps[-1] == 0.05


def test_a_profile_weighs_its_learned_count_of_clicks(rng):
    u = fresh(unit(rng), profile=True)
    assert u.prior() == 1.0 and click_step(u, 0.0) == 0.5  # the default: one click
    assert u.prior(0.25) == 0.25 and click_step(u, 0.0, 0.25) == pytest.approx(0.8)
    assert click_step(u, 0.0, 4.0) == pytest.approx(0.2)
    assert fresh(unit(rng)).prior(4.0) == 0.0  # no profile, no pseudo-count
    # the step rule and its replay agree at any weight
    item = unit(rng)
    live = fresh(u.vector, profile=True)
    apply_click(live, item, 0.05, profile_weight=0.25)
    live.clicks.append(3)
    again = fresh(u.vector, profile=True)
    again.clicks = [3]
    rederive(again, item[None], u.vector, 0.05, 0.2, profile_weight=0.25)
    np.testing.assert_allclose(again.vector, live.vector, atol=1e-6)


def test_first_click_of_a_blank_user_is_the_item(rng):
    u, v = fresh(), unit(rng)
    apply_click(u, v, 0.05)
    np.testing.assert_allclose(u.vector, v, atol=1e-6)


def test_click_moves_toward_item(rng):
    start, item = unit(rng), unit(rng)
    u = fresh(start, profile=True)
    before = float(u.vector @ item)
    apply_click(u, item, 0.05)
    assert float(u.vector @ item) > before
    assert abs(np.linalg.norm(u.vector) - 1.0) < 1e-5 and u.vector.dtype == np.float32


def test_skip_moves_away_a_little(rng):
    start, item = unit(rng), unit(rng)
    u = fresh(start, profile=True)
    clicked = fresh(start, profile=True)
    apply_skip(u, item, 0.05, skip_step=0.2)
    apply_click(clicked, item, 0.05)
    assert float(u.vector @ item) < float(start @ item)
    # "a little": the skip moves the vector less than a click would
    assert np.linalg.norm(u.vector - start) < np.linalg.norm(clicked.vector - start)
    assert abs(np.linalg.norm(u.vector) - 1.0) < 1e-5


def test_skip_of_a_blank_user_changes_nothing(rng):
    u = fresh()
    apply_skip(u, unit(rng), 0.05, 0.2)
    assert not u.vector.any()


def test_warm_user_moves_less_than_cold(rng):
    item = unit(rng)
    cold, warm = fresh(unit(rng)), fresh(unit(rng))
    cold.vector = warm.vector.copy()
    warm.clicks = list(range(30))
    start = warm.vector.copy()
    apply_click(cold, item, 0.05)
    apply_click(warm, item, 0.05)
    assert np.linalg.norm(warm.vector - start) < np.linalg.norm(cold.vector - start)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 12), st.booleans())
def test_rederive_equals_incremental_for_click_only_histories(seed, n_clicks, with_profile):
    rng = np.random.default_rng(seed)
    items = unit(rng, 20)
    rows = rng.integers(0, 20, n_clicks).tolist()
    prof = unit(rng) if with_profile else None
    live = fresh(prof, profile=with_profile)
    for r in rows:
        apply_click(live, items[r], 0.05)
        live.clicks.append(r)
    again = fresh(prof, profile=with_profile)
    again.clicks = list(rows)
    again.vector = np.zeros(DIM, np.float32)
    rederive(again, items[rows], prof, 0.05, 0.2)
    np.testing.assert_allclose(again.vector, live.vector, atol=1e-5)


def test_seen_is_clicks_and_skips(rng):
    u = fresh()
    u.clicks, u.skips = [1, 2], [3]
    assert u.seen() == {1, 2, 3}
    assert u.recent(1) == [2]


def test_normalise_of_zero_is_zero():
    assert not normalise(np.zeros(4, np.float32)).any()
    np.testing.assert_allclose(np.linalg.norm(normalise(np.ones(4, np.float32))), 1.0, atol=1e-6)


def test_user_table_rows_are_stable():
    t = UserTable(DIM)
    a = t.get_or_create("a")
    t.get_or_create("b")
    assert t.get_or_create("a") is a and len(t) == 2 and t.get("c") is None
    assert a.vector.shape == (DIM,) and not a.vector.any()


# ---- through the engine --------------------------------------------------------------------------

def test_engine_click_moves_user_toward_topic(engine):
    engine.recommend("u1", k=3, profile="recipe baking oven")
    assert {r.item_id.split("-")[0] for r in engine.recommend("u1", k=3)} == {"food"}
    for item in ("space-0", "space-1", "space-2"):
        engine.record("u1", item, "click")
    top = [r.item_id for r in engine.recommend("u1", k=2)]
    assert "space-3" in top  # the one space item not yet seen climbs from nowhere into the top 2


@pytest.mark.parametrize("online", [True, False])
def test_online_updates_flag(tmp_path, fake_encoder, catalog, online):
    from engine import Config, Engine

    with Engine.create(tmp_path / "s", Config(online_updates=online), encoder=fake_encoder) as eng:
        eng.add_items(catalog)
        eng.recommend("u", k=1, profile="football goal")
        v0 = eng._core.state.users.get("u").vector.copy()
        eng.record("u", "space-0", "click")
        moved = not np.allclose(eng._core.state.users.get("u").vector, v0)
        assert moved == online
        assert "space-0" not in {r.item_id for r in eng.recommend("u", k=12)}  # seen either way


def test_a_frozen_store_stays_frozen_through_a_reopen(tmp_path, catalog):
    """online_updates=False: recorded events change no list (apart from leaving seen items out),
    no count and no co-click, neither at once nor when the log is replayed or the snapshot read."""
    from engine import Config, Engine, Event

    from conftest import FakeEncoder

    history = [Event(u, i, "click", 1.0, t) for t, (u, i) in enumerate(
        [("a", "space-0"), ("a", "space-1"), ("b", "space-1"), ("b", "space-2"), ("c", "food-0")])]

    def picture(eng):
        st = eng._core.state
        return ([(r.item_id, r.score) for u in "abcz" for r in eng.recommend(u, k=12, exclude_seen=False)],
                st.items.clicks[:len(st.items)].tolist(), st.ranker.coclicks.scores([1], np.arange(12)).tolist())

    eng = Engine.create(tmp_path / "s", Config(online_updates=False, fsync=False), encoder=FakeEncoder())
    eng.add_items(catalog)
    eng.import_events(history)  # history comes in whatever the flag says
    before = picture(eng)
    for u, i in [("a", "space-2"), ("a", "space-3"), ("b", "space-3"), ("z", "ball-0"), ("z", "ball-1")]:
        eng.record(u, i, "click")
    eng.record("b", "food-1", "skip")
    assert picture(eng) == before
    assert "space-2" not in {r.item_id for r in eng.recommend("a", k=12)}  # seen all the same
    eng.close(save=False)  # replayed from the log
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder())
    assert picture(eng) == before
    eng.close()  # read from the snapshot
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=True)
    assert picture(eng) == before
    assert "space-2" not in {r.item_id for r in eng.recommend("a", k=12)}
    assert eng.stats()["events"] == len(history) + 6
    eng.close()

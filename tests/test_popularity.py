"""`Config.popularity_half_life_s`: popularity by clicks decayed with event time; None keeps counts."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Config, Engine, Event, Item

from conftest import small_catalog

HOUR = 3600
T0 = 1_700_000_000
#: food-0 clicked 3 times at T0; ball-0 twice, three hours later.
CLICKS = [("a", "food-0", T0), ("b", "food-0", T0), ("c", "food-0", T0 + 1),
          ("d", "ball-0", T0 + 3 * HOUR), ("e", "ball-0", T0 + 3 * HOUR)]


def ids(recs) -> list[str]:
    return [r.item_id for r in recs]


def store(tmp_path, fake_encoder, half_life, name="s") -> Engine:
    eng = Engine.create(tmp_path / name, Config(popularity_half_life_s=half_life), encoder=fake_encoder)
    eng.add_items(small_catalog())
    return eng


def decayed(eng: Engine, item_id: str) -> float:
    st = eng._core.state
    return float(st.ranker.popular.popularity(np.array([st.items.vocab.row(item_id)]))[0])


def test_counts_rank_popularity_by_default(tmp_path, fake_encoder):
    assert Config().popularity_half_life_s is None
    eng = store(tmp_path, fake_encoder, None)
    for u, i, t in CLICKS:
        eng.record(u, i, "click", timestamp=t)
    assert ids(eng.recommend("cold", k=2)) == ["food-0", "ball-0"]
    assert decayed(eng, "food-0") == 3.0
    eng.close(save=False)


def test_old_clicks_weigh_less(tmp_path, fake_encoder):
    eng = store(tmp_path, fake_encoder, HOUR)
    for u, i, t in CLICKS:
        eng.record(u, i, "click", timestamp=t)
    assert decayed(eng, "food-0") == pytest.approx(2 * 2 ** -3 + 2 ** (-(3 * HOUR - 1) / HOUR))
    assert decayed(eng, "ball-0") == pytest.approx(2.0)
    assert ids(eng.recommend("cold", k=2)) == ["ball-0", "food-0"]
    assert eng._core.state.items.clicks[eng._core.state.items.vocab.row("food-0")] == 3.0  # the counts stay counts
    eng.close(save=False)


@pytest.mark.parametrize("save", [False, True])
def test_decay_survives_reopen_and_does_not_depend_on_arrival_order(tmp_path, fake_encoder, save):
    eng = store(tmp_path, fake_encoder, HOUR)
    eng.import_events([Event(u, i, "click", timestamp=t) for u, i, t in reversed(CLICKS)])
    values = {i: decayed(eng, i) for i in ("food-0", "ball-0")}
    assert values["food-0"] == pytest.approx(2 * 2 ** -3 + 2 ** (-(3 * HOUR - 1) / HOUR))
    lists = eng.recommend("cold", k=4)
    eng.close(save=save)
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as again:
        assert {i: decayed(again, i) for i in values} == pytest.approx(values)
        assert again.recommend("cold", k=4) == lists


@pytest.mark.parametrize("bad", [0, -5, True, "1h"])
def test_half_life_is_checked(bad):
    with pytest.raises(ValueError, match="popularity_half_life_s must be None or a positive number"):
        Config(popularity_half_life_s=bad)


@pytest.mark.parametrize("half_life", [None, HOUR])
def test_the_popular_list_stays_exact_click_by_click(tmp_path, fake_encoder, half_life):
    """No rebuild between clicks: after each click the cached list equals a fresh one."""
    eng = Engine.create(tmp_path / "s", Config(popularity_half_life_s=half_life, fsync=False), encoder=fake_encoder)
    ids_ = [f"i{j}" for j in range(300)]
    eng.add_items([Item(i, f"item {i}", f"words {i} topic{j % 7}", ("c",)) for j, i in enumerate(ids_)])
    ranker, rng = eng._core.state.ranker, np.random.default_rng(3)
    ranker.popular.top(8, refresh=True)  # built once: the 256 best of 300
    first = ranker.popular.cache
    for j in range(400):  # skewed: a few items take most clicks, the tail climbs into the list
        item = ids_[min(int(rng.exponential(60)), len(ids_) - 1)]
        eng.record(f"u{j % 37}", item, "click", timestamp=T0 + 60 * j)
        cached = ranker.popular.cache
        assert cached is not None and len(cached) == len(first)
        np.testing.assert_array_equal(cached, ranker.popular.most_clicked(len(cached)))
    assert not np.array_equal(ranker.popular.cache, first)
    eng.close(save=False)

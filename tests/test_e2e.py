"""End to end with the real model on a real slice of MovieLens: the issue's story, step by step."""

from __future__ import annotations

import pytest

from engine import Engine, Item
from engine.demo import NEW_ITEM, PROFILE

pytestmark = pytest.mark.model

KIDS = {"Animation", "Children"}


def kid_share(eng: Engine, recs) -> int:
    return sum(bool(KIDS & set(eng.get_item(r.item_id).categories)) for r in recs)


@pytest.fixture
def eng(real_store, real_encoder):
    e = Engine.open(real_store, encoder=real_encoder)
    yield e
    e.close(save=False)


def test_the_slice_is_loaded(eng):
    stats = eng.stats()
    assert stats["live_items"] == 300 and stats["index"]["vectors"] == 300
    assert eng.get_item("1").title == "Toy Story (1995)"


def test_profile_gives_mostly_animation_and_children(eng):
    recs = eng.recommend("kid-fan", k=10, profile=PROFILE)
    assert len(recs) == 10
    assert kid_share(eng, recs) >= 7, [(r.title, eng.get_item(r.item_id).categories) for r in recs]
    # an unrelated profile gives a different, mostly non-children list
    crime = eng.recommend("noir-fan", k=10, profile="I love gritty crime thrillers about gangsters")
    assert kid_share(eng, crime) <= 3
    assert {r.item_id for r in crime} != {r.item_id for r in recs}


def test_three_clicks_move_the_list(eng):
    before = eng.recommend("clicker", k=10, profile=PROFILE)
    clicked = ["1", "4886", "6377"]  # Toy Story, Monsters Inc., Finding Nemo
    for item in clicked:
        eng.record("clicker", item, "click")
    after = eng.recommend("clicker", k=10)
    assert [r.item_id for r in after] != [r.item_id for r in before]
    assert not set(clicked) & {r.item_id for r in after}
    assert kid_share(eng, after) >= 5  # it moved toward what was clicked, not away
    assert eng.user_history("clicker") == clicked


def test_clicks_against_the_profile_pull_the_list_over(eng):
    before = eng.recommend("switcher", k=10, profile=PROFILE)
    crime = [r.item_id for r in eng.recommend("probe", k=3, profile="violent crime thriller heist")]
    for item in crime:
        eng.record("switcher", item, "click")
    after = eng.recommend("switcher", k=10)
    assert kid_share(eng, after) < kid_share(eng, before)


def test_new_item_is_found_at_once(eng):
    eng.add_items([NEW_ITEM])
    nearest = eng.similar_items(NEW_ITEM.item_id, k=3)
    assert kid_share(eng, nearest) >= 2
    close = nearest[0].item_id  # out of 301 items, the new one ranks high among its neighbour's
    assert NEW_ITEM.item_id in [r.item_id for r in eng.similar_items(close, k=20)]
    recs = eng.recommend("space-pup-fan", k=5, profile="an animated family adventure: puppies fly to the Moon")
    assert NEW_ITEM.item_id in [r.item_id for r in recs]


def test_removed_item_never_comes_back(eng):
    recs = eng.recommend("kid-fan-3", k=10, profile=PROFILE)
    gone = recs[0].item_id
    eng.remove_items([gone])
    assert gone not in [r.item_id for r in eng.recommend("kid-fan-3", k=50)]
    assert gone not in [r.item_id for r in eng.similar_items(recs[1].item_id, k=50)]


def test_restart_keeps_everything(real_store, real_encoder):
    with Engine.open(real_store, encoder=real_encoder) as eng:
        eng.recommend("keeper", k=10, profile=PROFILE)
        for item in ("1", "4886"):
            eng.record("keeper", item, "click")
        eng.add_items([NEW_ITEM])
        eng.remove_items(["2"])
        before = [(r.item_id, round(r.score, 5)) for r in eng.recommend("keeper", k=10)]
        sims = [r.item_id for r in eng.similar_items(NEW_ITEM.item_id, k=5)]
    with Engine.open(real_store, encoder=real_encoder) as eng:
        assert [(r.item_id, round(r.score, 5)) for r in eng.recommend("keeper", k=10)] == before
        assert [r.item_id for r in eng.similar_items(NEW_ITEM.item_id, k=5)] == sims
        assert eng.user_history("keeper") == ["1", "4886"]
        assert NEW_ITEM.item_id in eng and "2" not in eng
        assert eng.stats()["live_items"] == 300


def test_restart_without_save_replays_the_log(real_store, real_encoder):
    eng = Engine.open(real_store, encoder=real_encoder)
    eng.recommend("crashy", k=5, profile=PROFILE)
    eng.record("crashy", "1", "click")
    eng.add_items([Item("late-1", "Late Arrival (2026)", "an animated film about a lost robot",
                        ("Animation", "Children"))])
    before = [r.item_id for r in eng.recommend("crashy", k=10)]
    eng.close(save=False)  # as after a crash: only the event log has these
    with Engine.open(real_store, encoder=real_encoder) as again:
        assert [r.item_id for r in again.recommend("crashy", k=10)] == before
        assert "late-1" in again and again.user_history("crashy") == ["1"]

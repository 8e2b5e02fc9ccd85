"""`Item.expires_at`: from that time on an item is never returned; stored with the item."""

from __future__ import annotations

import json
import time

import pytest

from engine import Engine, Filter, InvalidInputError, Item
from engine.text.catalog import read_items

from conftest import small_catalog

PAST, FUTURE = 1_000_000_000, 4_000_000_000


def ids(recs) -> list[str]:
    return [r.item_id for r in recs]


@pytest.fixture
def dated(engine):
    engine.add_items([Item("space-old", "Old rocket", "rocket launch orbit moon", ("space",), expires_at=PAST),
                      Item("space-later", "Later rocket", "rocket launch orbit moon", ("space",), expires_at=FUTURE)])
    return engine


def test_an_expired_item_is_never_returned(dated):
    dated.recommend("u", k=1, profile="rocket launch orbit moon")
    assert "space-later" in ids(dated.recommend("u", k=3))
    everything = ids(dated.recommend("u", k=20))
    assert len(everything) == 13 and "space-old" not in everything
    assert "space-old" not in ids(dated.recommend("u", k=20, exclude_seen=False, candidates=["space-old", "food-0"]))
    assert "space-old" not in ids(dated.recommend("u", k=20, filter=Filter(categories_any=["space"])))
    assert "space-old" not in ids(dated.recommend("anon", k=20, history=["space-0"]))
    assert all("space-old" not in ids(r) for r in dated.recommend_many(["u", "cold"], k=20))
    near = ids(dated.similar_items("space-0", k=20))
    assert len(near) == 12 and "space-old" not in near
    assert "space-old" not in ids(dated.similar_items("space-later", k=20))
    assert "space-old" in dated and dated.get_item("space-old").expires_at == PAST  # kept, not returned


def test_an_item_disappears_when_its_time_comes(engine, monkeypatch):
    now = int(time.time())
    engine.add_items([Item("flash", "Flash sale", "rocket launch orbit moon", ("space",), expires_at=now + 60)])
    assert "flash" in ids(engine.recommend("u", k=13))
    monkeypatch.setattr(time, "time", lambda: now + 60)
    assert "flash" not in ids(engine.recommend("u", k=13))
    assert len(engine.recommend("u", k=13)) == 12  # k still filled from what qualifies


@pytest.mark.parametrize("save", [False, True])
def test_expiry_is_stored_with_the_item(tmp_path, fake_encoder, save):
    eng = Engine.create(tmp_path / "s", encoder=fake_encoder)
    eng.add_items([*small_catalog(), Item("gone", "Gone", "pasta", ("food",), expires_at=PAST)])
    eng.add_items([Item("food-1", "Food 1", "bread baking oven recipe", ("food",), expires_at=FUTURE)], upsert=True)
    eng.close(save=save)
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as again:
        assert again.get_item("gone").expires_at == PAST
        assert again.get_item("food-1").expires_at == FUTURE
        assert again.get_item("food-0").expires_at is None
        assert "gone" not in ids(again.recommend("u", k=20))


@pytest.mark.parametrize("bad", ["soon", -1, True, 1.5, 10**13])
def test_a_bad_expiry_names_the_rule_and_adds_nothing(engine, bad):
    with pytest.raises(InvalidInputError, match=r"row 2: expires_at must be None or an int of unix seconds"):
        engine.add_items([Item("ok", "Fine", "text"), Item("bad", "Bad", "text", expires_at=bad)])
    assert "ok" not in engine


def test_items_files_carry_expires_at(tmp_path):
    path = tmp_path / "items.jsonl"
    rows = [{"item_id": "a", "title": "A", "expires_at": FUTURE}, {"item_id": "b", "title": "B"},
            {"item_id": "c", "title": "C", "expires_at": None}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    assert [i.expires_at for i in read_items(path)] == [FUTURE, None, None]
    csv = tmp_path / "items.csv"
    csv.write_text(f"item_id,title,expires_at\na,A,{FUTURE}\nb,B,\n", encoding="utf-8")
    assert [i.expires_at for i in read_items(csv)] == [FUTURE, None]
    path.write_text(json.dumps({"item_id": "a", "title": "A", "expires_at": "2030-01-01"}) + "\n")
    with pytest.raises(InvalidInputError, match="row 1: expires_at must be"):
        read_items(path)

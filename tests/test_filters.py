"""Business rules (`engine.Filter`) inside the search: every candidate source, k whenever k qualify."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Config, Engine, Filter, InvalidInputError, Item
from engine.serving.index import VectorIndex

from conftest import small_catalog


def ids(recs) -> list[str]:
    return [r.item_id for r in recs]


@pytest.fixture
def narrow(tmp_path, fake_encoder):
    """A store whose ANN search fetches only 2 rows and that adds no popular or co-click rows,
    so anything past those 2 must come from the filtered search or the filtered top-up."""
    eng = Engine.create(tmp_path / "narrow", Config(retrieve=2, popular_candidates=0, coclick_candidates=0),
                        encoder=fake_encoder)
    eng.add_items(small_catalog())
    yield eng
    eng.close(save=False)


def test_categories_any_fills_k_from_inside_the_search(narrow):
    narrow.recommend("u", k=1, profile="rocket launch orbit moon")
    recs = narrow.recommend("u", k=4, filter=Filter(categories_any=["food"]))
    assert sorted(ids(recs)) == ["food-0", "food-1", "food-2", "food-3"]
    recs = narrow.recommend("u", k=8, filter=Filter(categories_any=["food", "ball"]))
    assert len(recs) == 8 and all(not i.startswith("space") for i in ids(recs))


def test_every_rule_and_their_combination(engine):
    engine.recommend("u", k=1, profile="rocket launch orbit moon")
    assert {i.split("-")[0] for i in ids(engine.recommend("u", k=12, filter=Filter(categories_none=["space"])))} \
        == {"food", "ball"}
    assert sorted(ids(engine.recommend("u", k=12, filter=Filter(allow=["ball-1", "food-2", "nope"])))) \
        == ["ball-1", "food-2"]
    assert "space-0" not in ids(engine.recommend("u", k=12, filter=Filter(deny=["space-0"])))
    both = Filter(categories_any=["space", "food"], categories_none=["food"], deny=["space-1"])
    assert sorted(ids(engine.recommend("u", k=12, filter=both))) == ["space-0", "space-2", "space-3"]


def test_filter_reaches_coclicks_popular_and_explicit_candidates(engine):
    for user in ("a", "b", "c"):  # food-0 is popular and co-clicked with space-0
        engine.record(user, "space-0", "click")
        engine.record(user, "food-0", "click")
    engine.record("d", "space-0", "click")
    no_food = Filter(categories_none=["food"])
    assert "food-0" in ids(engine.recommend("d", k=3))
    recs = engine.recommend("d", k=12, filter=no_food)
    assert len(recs) == 7 and not any(i.startswith("food") for i in ids(recs))
    assert "food-0" not in ids(engine.recommend("cold", k=12, filter=no_food))  # popularity prior
    assert ids(engine.recommend("d", k=5, candidates=["food-0", "ball-0"], filter=no_food)) == ["ball-0"]


def test_no_filter_and_an_empty_filter_change_nothing(engine):
    engine.recommend("u", k=1, profile="pasta recipe tomato sauce")
    engine.record("u", "food-0", "click")
    plain = engine.recommend("u", k=10)
    assert engine.recommend("u", k=10, filter=None) == plain
    assert engine.recommend("u", k=10, filter=Filter()) == plain


def test_filter_follows_reopen_and_upsert(engine, fake_encoder):
    engine.add_items([Item("space-0", "Space 0", "rocket launch orbit moon", ("food",))], upsert=True)
    assert "space-0" in ids(engine.recommend("u", k=12, filter=Filter(categories_any=["food"])))
    assert "space-0" not in ids(engine.recommend("u", k=12, filter=Filter(categories_any=["space"])))
    engine.save()
    path = engine.path
    engine.close()
    with Engine.open(path, encoder=fake_encoder) as again:
        got = ids(again.recommend("u", k=12, filter=Filter(categories_any=["food"])))
        assert sorted(got) == ["food-0", "food-1", "food-2", "food-3", "space-0"]


@pytest.mark.parametrize("kwargs, rule", [
    ({"categories_any": "space"}, "Filter.categories_any must be a list of strings"),
    ({"categories_none": [""]}, "Filter.categories_none: each category must be a non-empty string"),
    ({"allow": []}, "Filter.allow must name at least one item id"),
    ({"deny": [" x"]}, "Filter.deny: each item id must not start or end with whitespace"),
    ({"deny": 3}, "Filter.deny must be a list of strings"),
])
def test_bad_filter_names_the_rule(kwargs, rule):
    with pytest.raises(InvalidInputError, match=rule):
        Filter(**kwargs)


def test_a_bad_filter_changes_nothing(engine):
    with pytest.raises(InvalidInputError, match="filter must be an engine.Filter"):
        engine.recommend("newbie", k=3, profile="pasta recipe", filter={"categories_any": ["food"]})
    assert engine.stats()["users"] == 0


def test_filter_is_a_hashable_value():
    assert Filter(categories_any=["a", "a"], deny=("x",)) == Filter(categories_any=("a",), deny=["x"])
    assert len({Filter(allow=["x"]), Filter(allow=("x",))}) == 1


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_index_search_returns_only_allowed_rows(kind, rng):
    vecs = rng.standard_normal((300, 16)).astype(np.float32)
    index = VectorIndex(16, kind, nlist=4, nprobe=4)
    index.build(np.arange(300), vecs)
    index.remove([5])
    allowed = np.zeros(300, bool)
    allowed[[5, 7, 11, 100, 299]] = True
    rows, _ = index.search(vecs[0], 10, allowed=allowed)
    assert sorted(rows.tolist()) == [7, 11, 100, 299]  # removed row 5 stays out
    rows, _ = index.search(vecs[0], 10, exclude=np.array([7]), allowed=allowed[:120])
    assert sorted(rows.tolist()) == [11, 100]  # rows past the mask's end do not qualify


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_a_narrow_filter_fills_k_on_approximate_indexes(tmp_path, fake_encoder, rng, kind):
    eng = Engine.create(tmp_path / kind, Config(index=kind, retrieve=5, ivf_nprobe=1), encoder=fake_encoder)
    items = [Item(f"i{n}", f"Item {n}", categories=("rare",) if n % 50 == 7 else ("common",)) for n in range(400)]
    vecs = rng.standard_normal((400, fake_encoder.dim)).astype(np.float32)
    eng.add_items(items, vectors=vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    eng.record("u", "i0", "click")
    recs = eng.recommend("u", k=10, filter=Filter(categories_any=["rare"]))
    assert sorted(ids(recs)) == sorted(f"i{n}" for n in range(7, 400, 50))  # all 8 that qualify
    eng.close(save=False)

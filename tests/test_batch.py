"""`recommend_many`: one batched FAISS search, and exactly the lists the single calls return."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Config, Engine, Filter, InvalidInputError, Item
from engine.serving.index import VectorIndex



@pytest.fixture
def busy(tmp_path, fake_encoder, rng):
    """200 items with random vectors and 4 categories, a narrow ANN search, and users of every
    kind: clicks, skips, a profile, and none at all."""
    eng = Engine.create(tmp_path / "busy", Config(retrieve=8, popular_candidates=5, coclick_candidates=5),
                        encoder=fake_encoder)
    items = [Item(f"i{n}", f"Item {n}", categories=(f"c{n % 4}",)) for n in range(200)]
    vecs = rng.standard_normal((200, fake_encoder.dim)).astype(np.float32)
    eng.add_items(items, vectors=vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
    for u in range(12):
        for n in rng.choice(200, size=1 + u, replace=False):
            eng.record(f"u{u}", f"i{n}", "click" if n % 3 else "skip")
    eng.recommend("p", k=1, profile="rocket launch orbit moon")
    yield eng
    eng.close(save=False)


USERS = [f"u{u}" for u in range(12)] + ["p", "nobody", "u3"]


@pytest.mark.parametrize("kwargs", [
    {}, {"exclude_seen": False}, {"filter": Filter(categories_any=["c1", "c2"], deny=["i5"])},
    {"filter": Filter(allow=[f"i{n}" for n in range(0, 200, 7)])},
])
def test_batch_equals_single_calls(busy, kwargs):
    for k in (1, 10, 40):
        assert busy.recommend_many(USERS, k=k, **kwargs) == [busy.recommend(u, k=k, **kwargs) for u in USERS]


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_batch_equals_single_calls_on_an_approximate_index(tmp_path, fake_encoder, rng, kind):
    """The batch asks FAISS for more rows with one selector and drops each user's seen rows after,
    where a single call excludes them inside the search: on a narrow HNSW (or IVF) that could in
    principle find other rows. It must not change any answer (the service batches concurrent
    calls), and on FAISS it does not."""
    cfg = Config(index=kind, hnsw_m=4, hnsw_ef_search=8, retrieve=8, popular_candidates=3, coclick_candidates=3)
    with Engine.create(tmp_path / kind, cfg, encoder=fake_encoder) as eng:
        vecs = rng.standard_normal((600, fake_encoder.dim)).astype(np.float32)
        eng.add_items([Item(f"i{n}", f"Item {n}", categories=(f"c{n % 3}",)) for n in range(600)],
                      vectors=vecs / np.linalg.norm(vecs, axis=1, keepdims=True))
        for u in range(30):
            for n in rng.choice(600, size=1 + u, replace=False):
                eng.record(f"u{u}", f"i{n}")
        users = [f"u{u}" for u in range(30)] + ["nobody"]
        for kwargs in ({}, {"filter": Filter(categories_none=["c0"])}):
            assert eng.recommend_many(users, k=10, **kwargs) == [eng.recommend(u, k=10, **kwargs) for u in users]


def test_batch_searches_faiss_once(busy, monkeypatch):
    calls = []
    real = VectorIndex.search_batch

    def counted(self, queries, *args, **kwargs):
        calls.append(len(queries))
        return real(self, queries, *args, **kwargs)

    monkeypatch.setattr(VectorIndex, "search_batch", counted)
    busy.recommend_many(USERS, k=5)
    assert calls == [len(USERS) - 1]  # one call; "nobody" has no vector and does not search


def test_batch_on_an_empty_list_and_an_empty_store(busy, tmp_path, fake_encoder):
    assert busy.recommend_many([], k=3) == []
    with Engine.create(tmp_path / "empty", encoder=fake_encoder) as empty:
        assert empty.recommend_many(["a", "b"], k=3) == [[], []]


@pytest.mark.parametrize("user_ids, rule", [
    ("u1", "user_ids must be a list of user ids"),
    (["u1", ""], "each user_id must not be empty"),
    (["u1", 3], "each user_id must be a string"),
])
def test_batch_input_names_the_rule(engine, user_ids, rule):
    with pytest.raises(InvalidInputError, match=rule):
        engine.recommend_many(user_ids, k=3)


def test_batch_on_the_small_catalog(engine):
    engine.recommend("a", k=1, profile="pasta recipe tomato sauce")
    engine.record("b", "ball-0", "click")
    assert engine.recommend_many(["a", "b", "c"], k=4) == [engine.recommend(u, k=4) for u in "abc"]

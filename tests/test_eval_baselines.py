"""The baselines on a real slice: they beat random, and every method keeps the same contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine import Engine
from engine.evaluation.baselines.base import Query, TrainSet, top_k
from engine.evaluation.datasets import EvalDataset, load_dataset, positives, write_sample
from engine.evaluation.kindling_method import KindlingMethod, engine_config
from engine.evaluation.methods import BASELINES, build_methods, parse_methods
from engine.evaluation.protocols import run_item_cold, run_user_cold
from engine.evaluation.splits import user_cold_split

BUNDLED = Path(__file__).resolve().parent.parent / "index_data" / "movielens-small"
MIN_VALUE = 4.0
FAST = [m for m in BASELINES if m != "lm-profile"]
#: The engine's defaults with short training: these tests check the adapter, not the engine's quality.
QUICK = engine_config(0, proj_epochs=2, rerank_epochs=1)


def _build(names, protocol: str, encoder=None, workdir: Path = Path(".")):
    return build_methods(names, protocol, 0, lambda: encoder, workdir)


def test_content_and_hybrid_methods_beat_random_on_cold_items(ds: EvalDataset) -> None:
    out = run_item_cold(ds, _build(["random", "tfidf", "lightfm"], "item-cold"), min_value=MIN_VALUE)
    recall = {m: r["recall@20"] for m, r in out["results"].items()}
    assert out["split"]["test_users"] >= 30
    assert recall["tfidf"] > 2 * recall["random"], recall
    assert recall["lightfm"] > 2 * recall["random"], recall


def test_every_baseline_beats_random_on_cold_users(ds: EvalDataset) -> None:
    out = run_user_cold(ds, _build(FAST, "user-cold"), min_value=MIN_VALUE)
    for reveal in ("reveal=1", "reveal=5"):
        recall = {m: r["recall@20"] for m, r in out["results"][reveal].items()}
        for method in ("popularity", "itemknn", "als", "lightfm"):
            assert recall[method] > recall["random"] + 0.1, (reveal, recall)
        assert recall["tfidf"] > recall["random"], (reveal, recall)  # content alone is weak here


def _queries(ds: EvalDataset, train: TrainSet, n: int = 12) -> list[Query]:
    users = np.unique(train.events.user)[:n]
    return [Query(int(u), train.events.item[train.events.user == u][:5]) for u in users] + [
        Query(-1, train.events.item[:3], name="new"), Query(-1, train.events.item[:0], name="empty")]


@pytest.mark.parametrize("name", FAST + ["lm-profile"])
def test_method_contract(name: str, ds: EvalDataset, fake_encoder) -> None:
    split = user_cold_split(positives(ds.events, MIN_VALUE), np.random.default_rng(0))
    train = TrainSet(split.train, ds.items, ds.n_users, ds.user_ids)
    protocol = "item-cold" if name == "lightfm" else "user-cold"
    method, again = _build([name, name], protocol, fake_encoder)
    queries = [q for q in _queries(ds, train) if protocol == "user-cold" or q.user >= 0]
    method.fit(train)
    again.fit(train)
    candidates = np.arange(0, ds.n_items, 3)
    batch = method.recommend(queries, 10, candidates=candidates)
    for q, rows in zip(queries, batch):
        assert len(rows) == 10 and len(set(rows.tolist())) == 10
        assert np.isin(rows, candidates).all() and not np.isin(rows, q.history).any()
    if name != "random":  # random draws fresh numbers per call by design
        assert [r.tolist() for r in again.recommend(queries, 10, candidates=candidates)] == \
            [r.tolist() for r in batch], "same seed, same rankings"
        # batch == single calls, up to float rounding (BLAS sums a matrix product in another order)
        singles = np.vstack([method.scores([q]) for q in queries])
        np.testing.assert_allclose(singles, method.scores(queries), rtol=1e-5, atol=1e-6)
    assert len(method.recommend(queries[:1], 10, exclude_history=False)[0]) == 10


def test_lightfm_by_id_refuses_unknown_users(ds: EvalDataset) -> None:
    (method,) = _build(["lightfm"], "item-cold")
    method.fit(TrainSet(positives(ds.events, MIN_VALUE), ds.items, ds.n_users, ds.user_ids))
    with pytest.raises(ValueError, match="ranks only users seen in training"):
        method.recommend([Query(-1, np.array([1, 2]), name="stranger")], 5)


def test_ties_go_to_popular_items_then_a_seeded_coin() -> None:
    scores = np.array([0.0, 1.0, 0.0, 0.0])
    assert top_k(scores, 3, tiebreak=np.array([3, 0, 1, 2])).tolist() == [1, 2, 3]
    assert top_k(scores, 2, tiebreak=np.array([3, 0, 1, 2]), exclude=np.array([1])).tolist() == [2, 3]
    assert top_k(scores, 9, tiebreak=np.arange(4), candidates=np.array([3, 0])).tolist() == [0, 3]


def test_parse_methods() -> None:
    assert parse_methods("als, random") == ("random", "als")
    assert "kindling" in parse_methods(None)
    with pytest.raises(ValueError, match="unknown method.*choose from"):
        parse_methods("als,bpr")


def _isolation_queries(split, ds: EvalDataset) -> tuple[Query, list[Query]]:
    """User B, and other new users with histories of several lengths."""
    users = [int(u) for u in split.test_users[:4]]
    b = Query(-1, split.history[users[0]][:3], name=f"{ds.user_ids[users[0]]}@new")
    others = [Query(-1, split.history[u][:n], name=f"{ds.user_ids[u]}@new") for u, n in zip(users[1:], (1, 5, 6))]
    return b, others


@pytest.mark.parametrize("name", [m for m in FAST if m != "random"] + ["kindling"])
def test_one_users_query_never_changes_anothers_ranking(name: str, small: EvalDataset, fake_encoder,
                                                        tmp_path: Path) -> None:
    """Rank user B, query other new users with histories, rank B again: the same list. A method
    that learned from one test user's clicks would fail here. (Batch against single calls is
    the contract test's, up to float rounding.)"""
    split = user_cold_split(positives(small.events, MIN_VALUE), np.random.default_rng(0))
    train = TrainSet(split.train, small.items, small.n_users, small.user_ids)
    if name == "kindling":
        method = KindlingMethod(tmp_path, fake_encoder, config=QUICK)
    else:
        (method,) = _build([name], "user-cold", fake_encoder)
    method.fit(train)
    b, others = _isolation_queries(split, small)
    alone = method.recommend([b], 50)[0].tolist()
    for other in others:
        method.recommend([other], 50)
    assert method.recommend([b], 50)[0].tolist() == alone
    method.close()
    if name == "kindling":  # and the store holds exactly what fit was given: nothing was recorded
        with Engine.open(tmp_path / "kindling-1", encoder=fake_encoder, read_only=True) as eng:
            assert eng.stats()["events"] == len(split.train)
            assert eng.stats()["users"] == len(np.unique(split.train.user))


def test_kindling_ranks_only_candidates_on_cold_items(small: EvalDataset, fake_encoder,
                                                      tmp_path: Path) -> None:
    out = run_item_cold(small, [KindlingMethod(tmp_path, fake_encoder, config=QUICK)], min_value=MIN_VALUE, k=10)
    assert 0.0 < out["results"]["kindling"]["recall@10"] <= 1.0


@pytest.mark.model
def test_language_model_profile_beats_random_on_cold_items(small: EvalDataset, real_encoder) -> None:
    out = run_item_cold(small, _build(["random", "lm-profile"], "item-cold", real_encoder),
                        min_value=MIN_VALUE, k=10)
    recall = {m: r["recall@10"] for m, r in out["results"].items()}
    assert recall["lm-profile"] > recall["random"] + 0.05, recall


def test_profiles_from_users_table_reach_the_methods(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = write_sample(BUNDLED, tmp_path / "with-users", n_users=40, max_items=300)
    users = pq.read_table(path / "events.parquet").column("user_id").unique().to_pylist()
    profiles = ["I love animated films for children, Pixar and Disney" if i % 2 else
                "Dark war dramas and crime thrillers" for i in range(len(users))]
    pq.write_table(pa.table({"user_id": users, "profile": profiles}), path / "users.parquet")
    ds = load_dataset(path)
    assert ds.profile(0) in profiles
    out = run_user_cold(ds, _build(["popularity", "tfidf"], "user-cold"), min_value=MIN_VALUE, reveals=(0,))
    at0 = out["results"]["reveal=0"]
    assert at0["tfidf"] != at0["popularity"], "with a profile, TF-IDF ranks before any click"

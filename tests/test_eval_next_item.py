"""The next-item protocol: the leave-one-out split on hand cases, every method on a tiny dataset whose
next item is known, and no target ever in a method's training data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEncoder

from engine import Engine, Item
from engine.evaluation.baselines.base import Query, TrainSet
from engine.evaluation.baselines.sasrec import SASRecConfig, SASRecMethod, training_windows
from engine.evaluation.datasets import EvalDataset, EventTable
from engine.evaluation.kindling_method import engine_config
from engine.evaluation.methods import NEXT_ITEM_ONLY, build_methods
from engine.evaluation.next_item import NEXT_ITEM_KS, choose_next_item, run_next_item
from engine.evaluation.runner import ALL_METHODS, protocol_methods
from engine.evaluation.splits import HISTORY_CAP, next_item_split, next_item_validation


def _table(rows: list[tuple[int, int, int]]) -> EventTable:
    """(user, item, timestamp) rows, value 1, in the given order."""
    u, i, t = (np.array(c, dtype=np.int64) for c in zip(*rows))
    return EventTable(u, i, t, np.ones(len(rows)))


def _pairs(ev: EventTable) -> set[tuple[int, int]]:
    return set(zip(ev.user.tolist(), ev.item.tolist()))


# ---- the split ----------------------------------------------------------------------------------
def test_leave_one_out_by_time() -> None:
    # user 0: five items; the two at t=4 keep file order (7 then 8), item 5 repeats (first kept)
    # user 1: two items (too few: all train); user 2: exactly three
    ev = _table([(0, 5, 1), (0, 6, 2), (1, 1, 2), (0, 5, 3), (0, 7, 4), (0, 8, 4), (2, 1, 5),
                 (2, 2, 6), (1, 2, 7), (0, 9, 8), (2, 3, 9)])
    s = next_item_split(ev)
    assert s.test_users.tolist() == [0, 2] and s.targets.tolist() == [9, 3]
    assert s.history[0].tolist() == [5, 6, 7, 8] and s.times[0].tolist() == [1, 2, 4, 4]
    assert s.history[2].tolist() == [1, 2]
    assert _pairs(s.holdout) == {(0, 8), (2, 2)}
    assert _pairs(s.train) == {(0, 5), (0, 6), (0, 7), (1, 1), (1, 2), (2, 1)}
    assert np.all(np.diff(s.train.timestamp) >= 0), "training keeps time order"
    # validation: the same split over everything but the test targets; user 2 has too few left
    v = next_item_validation(ev)
    assert v.test_users.tolist() == [0] and v.targets.tolist() == [8]
    assert _pairs(v.holdout) == {(0, 7)} and (2, 2) in _pairs(v.train)
    for split in (s, v):
        for u, target in zip(split.test_users, split.targets):
            assert (u, target) not in _pairs(split.train) | _pairs(split.holdout)
            assert target not in split.history[int(u)]
    assert not {(0, 9), (2, 3)} & (_pairs(v.train) | _pairs(v.holdout))


def test_the_history_is_capped_and_the_rest_masked() -> None:
    n = HISTORY_CAP + 7
    s = next_item_split(_table([(0, i, i) for i in range(n)]))
    items, times, older = s.capped(0)
    assert items.tolist() == list(range(6, n - 1)) and len(items) == HISTORY_CAP
    assert times.tolist() == items.tolist() and older.tolist() == list(range(6))
    items, _, older = s.capped(0, cap=3)
    assert items.tolist() == [n - 4, n - 3, n - 2] and len(older) == n - 4
    q = Query(0, items, older=older)
    assert sorted(q.masked().tolist()) == list(range(n - 1))


def test_training_windows_cover_every_transition_once() -> None:
    x, y = training_windows([np.arange(7), np.arange(1), np.arange(2)], max_len=3)
    pairs = [(int(a) - 1, int(b) - 1) for xr, yr in zip(x, y) for a, b in zip(xr, yr) if b > 0]
    assert sorted(pairs) == [(0, 1)] + [(i, i + 1) for i in range(6)]
    assert np.all((x > 0) == (y > 0)) and x.shape[1] == 3


# ---- a tiny dataset whose next item is known -----------------------------------------------------
TOPICS = {
    "space": "rocket orbit astronaut galaxy telescope moon mars comet",
    "food": "pasta bread soup cake oven recipe sauce flour",
    "ball": "football goal league penalty keeper match striker cup",
    "music": "guitar piano drums violin concert melody chord singer",
}
CHAIN = 8
USERS, PAIRS = 120, 120


def _tiny() -> EvalDataset:
    """Four topics of CHAIN items each; every user walks a stretch of one topic's chain in order,
    so the next item is the successor of the last one, and the topic's words say which it is."""
    items, rng = [], np.random.default_rng(7)
    for topic, words in TOPICS.items():
        for n, word in enumerate(words.split()):
            items.append(Item(f"{topic}-{n}", f"{topic} {word}", f"{topic} {word} {n}", (topic,)))
    rows, t = [], 0
    for u in range(USERS + PAIRS):
        topic = u % len(TOPICS)
        # the first USERS users are evaluated; the rest click two neighbours and only train,
        # so that every step of every chain is in the training data
        length = int(rng.integers(3, 7)) if u < USERS else 2
        start = int(rng.integers(0, CHAIN - length + 1))
        for step in range(length):
            t += 1
            rows.append((u, topic * CHAIN + start + step, t))
    ev = _table(rows)
    return EvalDataset("chains", tuple(items), np.array([it.item_id for it in items], dtype=object),
                       np.array([f"u{u}" for u in range(USERS + PAIRS)], dtype=object), ev)


#: Methods that know nothing of the user: their scores do not find the next item.
BLIND = ("random", "popularity")


@pytest.fixture(scope="module")
def chains_result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    encoder = FakeEncoder()
    names = protocol_methods("next-item", ALL_METHODS)
    methods = build_methods(names, "next-item", 0, lambda: encoder, tmp_path_factory.mktemp("chains"))
    for m in methods:
        if m.name.startswith("kindling"):
            m.config = engine_config(0, proj_epochs=3, rerank_epochs=2)
    return run_next_item(_tiny(), methods)


def test_every_method_is_measured_and_knows_the_next_item(chains_result: dict) -> None:
    results = chains_result["results"]
    assert list(results) == protocol_methods("next-item", ALL_METHODS)
    assert set(NEXT_ITEM_ONLY) <= set(results)
    for name, metrics in results.items():
        assert set(metrics) == {f"{m}@{k}" for k in NEXT_ITEM_KS for m in ("recall", "ndcg")}, name
        assert metrics["recall@10"] <= metrics["recall@50"] and metrics["ndcg@10"] <= metrics["ndcg@50"]
    # 26 unseen items at least: ten of them at random hold the target well under half the time
    assert results["random"]["recall@10"] < 0.6
    for name in results:
        if name not in BLIND:
            assert results[name]["recall@10"] >= 0.8, (name, results[name])
    # the successor is first for a model of order: SASRec learns the chain
    assert results["sasrec"]["ndcg@10"] > 0.85, results["sasrec"]


def test_the_json_holds_per_user_values(chains_result: dict) -> None:
    per_user = chains_result["per_user"]
    assert len(per_user["users"]) == chains_result["split"]["test_users"] == USERS
    for name, metrics in chains_result["results"].items():
        values = per_user["results"][name]["ndcg@10"]
        assert np.mean(values) == pytest.approx(metrics["ndcg@10"], abs=1e-4)
    assert chains_result["ks"] == list(NEXT_ITEM_KS) and chains_result["protocol"] == "next-item"
    assert set(chains_result["chosen"]["sasrec"]) == {"dropout", "validation_ndcg", "epochs", "stopped_by_budget"}


class Spy:
    """A method that remembers what it was given and ranks by item row."""

    name = "spy"

    def fit(self, train: TrainSet) -> None:
        self.train = train

    def recommend(self, queries, k, candidates=None, exclude_history=True):
        self.queries = list(queries)
        return [np.setdiff1d(np.arange(self.train.n_items), q.masked())[:k] for q in queries]

    def close(self) -> None:
        pass


@pytest.mark.parametrize("split_kind", ["test", "validation"])
def test_no_target_reaches_training(split_kind: str, tmp_path: Path, fake_encoder) -> None:
    ds = _tiny()
    split = choose_next_item(ds.events, split_kind)
    targets = set(zip(split.test_users.tolist(), split.targets.tolist()))
    test_targets = set(zip(*(a.tolist() for a in (next_item_split(ds.events).test_users,
                                                    next_item_split(ds.events).targets))))
    spy = Spy()
    kindling = build_methods(["kindling"], "next-item", 0, lambda: fake_encoder, tmp_path)[0]
    kindling.config = engine_config(0, proj_epochs=1, rerank_epochs=1)
    run_next_item(ds, [spy, kindling], split_kind=split_kind)
    seen = _pairs(spy.train.events) | _pairs(spy.train.holdout)
    assert not targets & seen and not test_targets & seen
    assert all(t not in q.history for q, (_, t) in zip(spy.queries, sorted(targets)))
    # the online path recorded each user's holdout click, and never a target
    store = Engine.open(tmp_path / "next-item" / "kindling-1", encoder=fake_encoder, read_only=True)
    try:
        for u, t in targets:
            history = store.user_history(str(ds.user_ids[u]))
            assert ds.items[t].item_id not in history
            assert history[-1] == ds.items[int(split.history[u][-1])].item_id
    finally:
        store.close(save=False)


def test_sasrec_leaves_the_global_torch_seed_alone() -> None:
    import torch

    ds = _tiny()
    split = next_item_split(ds.events)
    train = TrainSet(split.train, ds.items, ds.n_users, ds.user_ids, holdout=split.holdout)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    method = SASRecMethod(0, SASRecConfig(dropouts=(0.2,), max_epochs=3))
    method.fit(train)
    assert torch.equal(torch.rand(3), expected)
    assert method.chosen["dropout"] == 0.2 and 1 <= method.chosen["epochs"] <= 3
    assert method.chosen["stopped_by_budget"] is False

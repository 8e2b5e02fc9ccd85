"""The replay: event order, items entering at their first event, and the players."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.evaluation.baselines.base import TrainSet
from engine.evaluation.datasets import EvalDataset, EventTable, positives
from engine.evaluation.kindling_method import engine_config, open_engine
from engine.evaluation.players import CoocPlayer, EnginePlayer, FrozenEnginePlayer, Player, PopularityPlayer
from engine.evaluation.replay import catalog_at_cut, replay, run_replay
from engine.evaluation.splits import replay_split, replay_validation

MIN_VALUE = 4.0
QUICK = dict(proj_epochs=2, rerank_epochs=1)


def _train(ds: EvalDataset, split) -> TrainSet:
    return TrainSet(positives(split.train, MIN_VALUE), ds.items, ds.n_users, ds.user_ids)


class Recorder(Player):
    """A real player that only writes down what it was asked and told, in order."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.last_item: int | None = None
        self.added: list[np.ndarray] = []

    def add_items(self, rows: np.ndarray) -> None:
        self.added.append(rows)
        self.calls += [("add", -1, int(r)) for r in rows]

    def recommend(self, user: int, k: int, consumed: set[int], disliked: set[int]) -> np.ndarray:
        self.calls.append(("recommend", user, -1))
        assert disliked <= consumed
        return np.array([self.last_item if self.last_item is not None else 0])

    def record(self, user: int, item: int, timestamp: int) -> None:
        self.calls.append(("record", user, item))
        self.last_item = item


def test_replay_recommends_before_each_event_is_shown(ds: EvalDataset) -> None:
    split = replay_split(ds.events)
    stream_pos = split.stream.take(split.stream.value >= MIN_VALUE)
    player = Recorder()
    log = replay(ds, [player, PopularityPlayer(_train(ds, split))], split, MIN_VALUE, k=5)
    kinds = [c[0] for c in player.calls if c[0] != "add"]
    assert kinds == ["recommend", "record"] * len(stream_pos)
    recorded = [(u, i) for kind, u, i in player.calls if kind == "record"]
    assert recorded == list(zip(stream_pos.user.tolist(), stream_pos.item.tolist()))
    recommended_for = [u for kind, u, _ in player.calls if kind == "recommend"]
    assert recommended_for == stream_pos.user.tolist() == log.user.tolist()
    # the recorder "recommends" the last item it was told: a hit would mean an event seen too early
    repeats = stream_pos.item[1:] == stream_pos.item[:-1]
    assert log.hits["recorder"][1:].sum() == repeats.sum()
    assert log.cold_user.tolist() == (~np.isin(stream_pos.user, split.train.user)).tolist()
    assert log.cold_item.tolist() == (~np.isin(stream_pos.item, split.train.item)).tolist()


def test_items_enter_at_their_first_event_not_at_the_cut(ds: EvalDataset) -> None:
    split = replay_split(ds.events)
    live = catalog_at_cut(split, ds.n_items)
    assert live.tolist() == np.isin(np.arange(ds.n_items), split.train.item).tolist()
    player = Recorder()
    replay(ds, [player], split, MIN_VALUE, k=5)
    added = np.concatenate(player.added)
    entering = np.setdiff1d(split.stream.item, split.train.item)
    assert len(entering) > 0 and sorted(added.tolist()) == entering.tolist(), "each new item once"
    # walk the calls with the stream: an item is added after every positive before its first
    # event's time (no earlier), and before the recommend for that event (no later)
    first_time = {int(i): int(split.stream.timestamp[np.argmax(split.stream.item == i)]) for i in entering}
    pos = split.stream.take(split.stream.value >= MIN_VALUE)
    event, known = 0, set(np.flatnonzero(live).tolist())
    for kind, _, item in player.calls:
        if kind == "add":
            assert event == len(pos) or first_time[item] <= pos.timestamp[event]
            assert event == 0 or first_time[item] > pos.timestamp[event - 1]
            known.add(item)
        elif kind == "recommend":
            assert int(pos.item[event]) in known, "recommended before the event's item entered"
            event += 1


def test_score_players_mask_items_until_they_enter(ds: EvalDataset) -> None:
    split = replay_split(ds.events)
    train = _train(ds, split)
    live = catalog_at_cut(split, ds.n_items)
    new = np.flatnonzero(~live)[:3]
    for player in (PopularityPlayer(train, live), CoocPlayer(train, live)):
        user = int(split.train.user[0])
        consumed = set(split.train.item[split.train.user == user].tolist())
        top = player.recommend(user, ds.n_items, consumed, set())
        assert live[top].all() and not set(top.tolist()) & consumed
        assert len(top) == live.sum() - len(consumed)
        player.add_items(new)
        assert set(new.tolist()) <= set(player.recommend(user, ds.n_items, consumed, set()).tolist())


def _tiny_train() -> TrainSet:
    from engine.types import Item

    items = tuple(Item(str(i), f"item {i}") for i in range(5))
    # users 0: {0, 1}; 1: {0, 2}; 2: {1, 2, 3}
    ev = EventTable(np.array([0, 0, 1, 1, 2, 2, 2]), np.array([0, 1, 0, 2, 1, 2, 3]),
                    np.arange(7, dtype=np.int64), np.ones(7))
    return TrainSet(ev, items, 4, np.array(["a", "b", "c", "d"], dtype=object))


def test_cooc_player_scores_by_hand() -> None:
    player = CoocPlayer(_tiny_train(), live=np.array([True, True, True, True, False]))
    player.record(3, 0, 10)  # user 3 likes item 0: C[0, 1] = 1, C[0, 2] = 1, C[0, 3] = 0
    pop = np.array([3, 2, 2, 1, 0], float)
    expect = np.log1p(np.array([0, 1, 1, 0, 0])) + np.log1p(pop)
    np.testing.assert_allclose(player.scores(3)[1:], expect[1:])
    assert player.recommend(3, 9, {0}, set()).tolist() == [1, 2, 3]  # 4 has not entered; ties by row
    player.record(3, 2, 11)  # now C[0, 2] = 2, and via item 2: C[2, 1] = 1, C[2, 3] = 1
    expect = np.log1p(np.array([0, 1 + 1, 0, 0 + 1, 0])) + np.log1p(np.array([3, 2, 3, 1, 0], float))
    np.testing.assert_allclose(player.scores(3)[[1, 3, 4]], expect[[1, 3, 4]])
    player.add_items(np.array([4]))
    assert player.recommend(3, 9, {0, 2}, set()).tolist() == [1, 3, 4]


def test_cooc_player_matches_the_co_occurrence_matrix(ds: EvalDataset) -> None:
    split = replay_split(ds.events)
    train = _train(ds, split)
    player = CoocPlayer(train)
    x = train.matrix().toarray()
    c = x.T @ x
    np.fill_diagonal(c, 0)
    for user in np.unique(train.events.user)[:5]:
        liked = np.flatnonzero(x[user])
        others = np.setdiff1d(np.arange(ds.n_items), liked)
        expect = np.log1p(c[liked].sum(axis=0)) + np.log1p(train.popularity())
        np.testing.assert_allclose(player.scores(int(user))[others], expect[others], rtol=1e-6)


def test_frozen_engine_asks_with_the_history_and_learns_nothing(small: EvalDataset, fake_encoder,
                                                                tmp_path: Path) -> None:
    split = replay_split(small.events)
    train = _train(small, split)
    live = catalog_at_cut(split, small.n_items)
    items = [small.items[r] for r in np.flatnonzero(live)]
    eng = open_engine(tmp_path / "frozen", train, fake_encoder, engine_config(0, online_updates=False, **QUICK), items)
    player = FrozenEnginePlayer("kindling-frozen", eng, small, train)
    user = int(train.events.user[0])
    history = [small.item_ids[i] for i in train.events.item[train.events.user == user]]
    before = eng.stats()
    first = player.recommend(user, 10, set(), set())
    direct = eng.recommend(small.user_ids[user], k=10, history=history)
    row_of = {item_id: row for row, item_id in enumerate(small.item_ids)}
    assert first.tolist() == [row_of[r.item_id] for r in direct]
    player.record(user, int(first[0]), 0)
    assert eng.stats() == before, "the frozen engine records nothing"
    assert int(first[0]) not in player.recommend(user, 10, set(), set()).tolist(), "the click joins the history"
    new = np.flatnonzero(~live)[:2]
    player.add_items(new)
    assert all(small.item_ids[r] in eng for r in new)
    player.close()


def test_replay_with_both_engines_and_its_json(small: EvalDataset, fake_encoder, tmp_path: Path) -> None:
    split = replay_validation(small.events)
    train = _train(small, split)
    live = catalog_at_cut(split, small.n_items)
    items = [small.items[r] for r in np.flatnonzero(live)]
    online = EnginePlayer("kindling", open_engine(tmp_path / "on", train, fake_encoder,
                                                  engine_config(0, **QUICK), items), small)
    frozen = FrozenEnginePlayer("kindling-frozen", open_engine(tmp_path / "off", train, fake_encoder,
                                engine_config(0, online_updates=False, **QUICK), items), small, train)
    log = replay(small, [online, frozen, CoocPlayer(train, live)], split, MIN_VALUE, k=10)
    for p in (online, frozen):
        p.close()
    assert log.timestamp.max() < replay_split(small.events).cut
    assert set(log.hits) == {"kindling", "kindling-frozen", "cooc"} and len(log.user) > 0
    out, _ = run_replay(small, tmp_path / "r", lambda: fake_encoder, k=10, min_value=MIN_VALUE,
                        methods=["popularity", "cooc"], split_kind="validation")
    assert out["split_kind"] == "validation" and set(out["results"]) == {"popularity", "cooc"}
    assert out["split"]["items_at_cut"] == int(live.sum()) and out["split"]["items_entering"] >= 1
    pu = out["per_user"]
    assert sum(pu["events"]) == out["split"]["replayed_positives"]
    for name, res in out["results"].items():
        assert sum(pu["results"][name]["hits"]) / sum(pu["events"]) == pytest.approx(res["hit_rate@10"])
    assert set(out["timings_s"]["cooc"]) == {"fit", "rank"}


def test_top_rows_matches_a_full_sort_with_ties_to_the_lower_row() -> None:
    from engine.evaluation.baselines.base import top_k
    from engine.evaluation.players import top_rows

    rng = np.random.default_rng(3)
    for _ in range(50):
        n = int(rng.integers(1, 40))
        scores = rng.integers(0, 4, n).astype(float)  # many ties
        allowed = rng.random(n) < 0.7
        k = int(rng.integers(1, 12))
        expect = top_k(scores, k, np.arange(n), candidates=np.flatnonzero(allowed))
        assert top_rows(scores, k, allowed).tolist() == expect.tolist()


def test_both_engines_start_from_one_fit(small: EvalDataset, fake_encoder, tmp_path: Path) -> None:
    from engine import Engine
    from engine.evaluation.players import build_players

    split = replay_split(small.events)
    train = _train(small, split)
    live = catalog_at_cut(split, small.n_items)
    timings: dict[str, float] = {}
    players = build_players(["kindling", "kindling-frozen"], train, small, tmp_path, lambda: fake_encoder, 0,
                            live, timings)
    assert [p.name for p in players] == ["kindling", "kindling-frozen"] and set(timings) == {p.name for p in players}
    assert isinstance(players[1], FrozenEnginePlayer)
    for p in players:
        p.close()
    history = [small.item_ids[i] for i in train.events.item[:6]]
    lists = []
    for name in ("kindling", "kindling-frozen"):
        with Engine.open(tmp_path / name, encoder=fake_encoder, read_only=True) as eng:
            lists.append([(r.item_id, r.score) for r in eng.recommend("someone", k=20, history=history)])
    assert lists[0] == lists[1], "the frozen engine is the online engine's fitted store"

"""The split rules, on a small real slice of MovieLens (the first 60 users)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.evaluation.baselines.base import TrainSet
from engine.evaluation.datasets import (
    DatasetError, EvalDataset, first_occurrences, load_dataset, positives, write_sample,
)
from engine.evaluation.replay import Player, PopularityPlayer, replay
from engine.evaluation.splits import item_cold_split, replay_split, user_cold_split

BUNDLED = Path(__file__).resolve().parent.parent / "index_data" / "movielens-small"
MIN_VALUE = 4.0


@pytest.fixture(scope="module")
def ds(tmp_path_factory: pytest.TempPathFactory) -> EvalDataset:
    return load_dataset(write_sample(BUNDLED, tmp_path_factory.mktemp("eval-slice"), n_users=60))


def test_sample_is_a_canonical_slice(ds: EvalDataset) -> None:
    assert ds.n_users == 60
    assert 1000 < ds.n_items < ds.events.item.shape[0]
    assert np.all(np.diff(ds.events.timestamp) >= 0), "events are kept in time order"


def test_positives_and_first_occurrences() -> None:
    from engine.evaluation.datasets import EventTable

    ev = EventTable(np.array([0, 0, 1, 0]), np.array([3, 3, 3, 4]), np.array([1, 2, 3, 4]),
                    np.array([4.0, 5.0, 2.0, 4.5]))
    assert positives(ev, 4.0).value.tolist() == [4.0, 5.0, 4.5]
    assert len(positives(ev, None)) == 4
    firsts = first_occurrences(ev)
    assert firsts.timestamp.tolist() == [1, 3, 4]


def test_item_cold_split_rules(ds: EvalDataset) -> None:
    pos = positives(ds.events, MIN_VALUE)
    split = item_cold_split(pos, np.random.default_rng(0))
    with_pos = np.unique(pos.item)
    assert len(split.cold_items) == round(0.2 * len(with_pos))
    assert np.isin(split.cold_items, with_pos).all()
    assert not np.isin(split.train.item, split.cold_items).any(), "a cold item's positive is in training"
    assert len(split.train) + sum(len(t) for t in split.targets.values()) <= len(first_occurrences(pos))
    for user in split.test_users:
        assert (split.train.user == user).any()
        targets = split.targets[int(user)]
        assert len(targets) >= 1 and np.isin(targets, split.cold_items).all()
    # every user with a training positive and a cold positive is a test user
    cold_pos_users = np.unique(pos.user[np.isin(pos.item, split.cold_items)])
    expected = np.intersect1d(cold_pos_users, np.unique(split.train.user))
    assert split.test_users.tolist() == expected.tolist()


def test_splits_are_seeded(ds: EvalDataset) -> None:
    pos = positives(ds.events, MIN_VALUE)
    a = item_cold_split(pos, np.random.default_rng(7))
    b = item_cold_split(pos, np.random.default_rng(7))
    c = item_cold_split(pos, np.random.default_rng(8))
    assert a.cold_items.tolist() == b.cold_items.tolist() != c.cold_items.tolist()
    u1 = user_cold_split(pos, np.random.default_rng(7))
    u2 = user_cold_split(pos, np.random.default_rng(7))
    assert u1.test_users.tolist() == u2.test_users.tolist()


def test_user_cold_split_rules(ds: EvalDataset) -> None:
    pos = positives(ds.events, MIN_VALUE)
    split = user_cold_split(pos, np.random.default_rng(0))
    users, counts = np.unique(first_occurrences(pos).user, return_counts=True)
    assert split.n_eligible == int((counts >= 6).sum())
    assert len(split.test_users) == round(0.2 * split.n_eligible)
    assert np.isin(split.test_users, users[counts >= 6]).all()
    assert not np.isin(split.train.user, split.test_users).any(), "a test user's event is in training"
    for user in split.test_users:
        times = split.times[int(user)]
        assert np.all(np.diff(times) >= 0), "a test user's positives must be in time order"
        for n in (0, 1, 3, 5):
            revealed, revealed_times, targets = split.reveal(int(user), n)
            assert len(revealed) == n and len(targets) >= 1
            assert not np.isin(targets, revealed).any()
            # the revealed are the n earliest positives
            assert revealed_times.max(initial=0) <= times[n:].min()
            user_pos = pos.take(pos.user == user)
            assert set(revealed) | set(targets) == set(user_pos.item.tolist())


def test_replay_split_cuts_at_the_time_quantile(ds: EvalDataset) -> None:
    split = replay_split(ds.events)
    assert split.train.timestamp.max() < split.cut <= split.stream.timestamp.min()
    assert len(split.train) + len(split.stream) == len(ds.events)
    assert abs(len(split.stream) / len(ds.events) - 0.2) < 0.05
    with pytest.raises(ValueError, match="time order"):
        replay_split(ds.events.take(np.arange(len(ds.events))[::-1]))


class Recorder(Player):
    """A real player that only writes down what it was asked and told, in order."""

    name = "recorder"

    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []
        self.last_item: int | None = None

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
    train = TrainSet(positives(split.train, MIN_VALUE), ds.items, ds.n_users, ds.user_ids)
    log = replay(ds, [player, PopularityPlayer(train)], MIN_VALUE, k=5)
    kinds = [c[0] for c in player.calls]
    assert kinds == ["recommend", "record"] * len(stream_pos)
    recorded = [(u, i) for kind, u, i in player.calls if kind == "record"]
    assert recorded == list(zip(stream_pos.user.tolist(), stream_pos.item.tolist()))
    recommended_for = [u for kind, u, _ in player.calls if kind == "recommend"]
    assert recommended_for == stream_pos.user.tolist()
    # the recorder "recommends" the last item it was told: a hit would mean an event seen too early
    repeats = stream_pos.item[1:] == stream_pos.item[:-1]
    assert log.hits["recorder"][1:].sum() == repeats.sum()
    assert log.cold_user.tolist() == (~np.isin(stream_pos.user, split.train.user)).tolist()
    assert log.cold_item.tolist() == (~np.isin(stream_pos.item, split.train.item)).tolist()


def test_replay_popularity_never_recommends_what_was_consumed(ds: EvalDataset) -> None:
    split = replay_split(ds.events)
    train = TrainSet(positives(split.train, MIN_VALUE), ds.items, ds.n_users, ds.user_ids)
    player = PopularityPlayer(train)
    consumed = set(split.train.item[split.train.user == split.train.user[0]].tolist())
    top = player.recommend(int(split.train.user[0]), 50, consumed, set())
    assert len(top) == 50 and not set(top.tolist()) & consumed
    counts = train.popularity()
    assert counts[top[0]] == counts[np.setdiff1d(np.arange(ds.n_items), list(consumed))].max()


def test_a_broken_dataset_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="needs events.parquet"):
        write_only_items(tmp_path)
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="must be a directory"):
        load_dataset(tmp_path / "missing")
    (tmp_path / "events.csv").write_text("user_id,item_id,timestamp\nu1,1,5\n")
    (tmp_path / "events.jsonl").write_text('{"user_id": "u1", "item_id": "1", "timestamp": 5}\n')
    with pytest.raises(DatasetError, match="exactly one events"):
        load_dataset(tmp_path)
    (tmp_path / "events.jsonl").unlink()
    (tmp_path / "events.csv").write_text("user_id,item\nu1,1\n")
    with pytest.raises(DatasetError, match="item_id"):
        load_dataset(tmp_path)
    (tmp_path / "events.csv").write_text("user_id,item_id\nu1,1\n")
    with pytest.raises(DatasetError, match="timestamp"):
        load_dataset(tmp_path)


def write_only_items(path: Path) -> None:
    (path / "items.csv").write_text("item_id,title,text,categories\n1,Toy Story,,Animation|Children\n")

"""The split rules, on a small real slice of MovieLens (the first 60 users)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engine.evaluation.datasets import (
    DatasetError, EvalDataset, first_occurrences, load_dataset, positives, write_sample,
)
from engine.evaluation.splits import (
    check_split_kind, item_cold_split, item_cold_validation, replay_split, replay_validation, user_cold_split,
    user_cold_validation,
)

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


def _triples(events) -> set[tuple[int, int, int]]:
    return set(zip(events.user.tolist(), events.item.tolist(), events.timestamp.tolist()))


def test_item_cold_validation_uses_only_the_training_part(ds: EvalDataset) -> None:
    pos = positives(ds.events, MIN_VALUE)
    test = item_cold_split(pos, np.random.default_rng(0))
    val = item_cold_validation(pos, np.random.default_rng(0))
    assert len(val.cold_items) == round(0.2 * len(np.unique(test.train.item)))
    assert not np.isin(val.cold_items, test.cold_items).any(), "a test cold item is a validation cold item"
    assert _triples(val.train) <= _triples(test.train)
    assert not np.isin(val.train.item, test.cold_items).any()
    val_targets = [(int(u), int(i)) for u, items in val.targets.items() for i in items]
    train_pairs = set(zip(test.train.user.tolist(), test.train.item.tolist()))
    assert val_targets and set(val_targets) <= train_pairs, "a validation target outside the training part"
    assert np.isin(val.test_users, val.train.user).all()
    again = item_cold_validation(pos, np.random.default_rng(0))
    assert again.cold_items.tolist() == val.cold_items.tolist()


def test_user_cold_validation_uses_only_the_training_users(ds: EvalDataset) -> None:
    pos = positives(ds.events, MIN_VALUE)
    test = user_cold_split(pos, np.random.default_rng(0))
    val = user_cold_validation(pos, np.random.default_rng(0))
    assert len(val.test_users) >= 1 and not np.isin(val.test_users, test.test_users).any()
    assert not np.isin(val.train.user, test.test_users).any(), "a test user's event is in validation training"
    assert _triples(val.train) <= _triples(test.train)
    train_pairs = set(zip(test.train.user.tolist(), test.train.item.tolist()))
    for user in val.test_users:
        assert {(int(user), int(i)) for i in val.history[int(user)]} <= train_pairs
    assert val.n_eligible == int((np.unique(test.train.user, return_counts=True)[1] >= 6).sum())


def test_replay_validation_replays_the_tail_before_the_cut(ds: EvalDataset) -> None:
    test = replay_split(ds.events)
    val = replay_validation(ds.events)
    assert val.stream.timestamp.max() < test.cut, "a validation event after the real cut"
    assert val.train.timestamp.max() < val.cut <= val.stream.timestamp.min()
    assert val.cut == int(np.quantile(test.train.timestamp, 0.8))
    assert len(val.train) + len(val.stream) == len(test.train)
    with pytest.raises(ValueError, match="split must be one of test, validation"):
        check_split_kind("holdout")


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

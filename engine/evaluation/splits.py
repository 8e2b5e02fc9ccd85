"""The three cold-start splits, exactly as the protocols define them, each from a seeded Generator."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .datasets import EventTable, first_occurrences

COLD_FRACTION = 0.2
MIN_USER_POSITIVES = 6
REVEALS: tuple[int, ...] = (0, 1, 3, 5)
REPLAY_QUANTILE = 0.8
#: Next-item: a user needs this many distinct positives (at least one to train on, the one before
#: the target, the target), and a method sees at most the last HISTORY_CAP of them.
NEXT_ITEM_MIN_POSITIVES = 3
HISTORY_CAP = 50
#: Which part of a seed's split a run measures on: the test part, or a validation part carved out
#: of its training part with the same protocol (for tuning without touching the test part).
SPLIT_KINDS: tuple[str, ...] = ("test", "validation")


@dataclass(frozen=True)
class ItemColdSplit:
    """`train` holds no positive of a cold item; `targets[u]` are user u's cold positives (item rows)."""

    train: EventTable
    cold_items: np.ndarray
    test_users: np.ndarray
    targets: dict[int, np.ndarray]
    n_items_with_positives: int


@dataclass(frozen=True)
class UserColdSplit:
    """`train` holds no event of a test user; `history[u]` are u's distinct positives in time order
    and `times[u]` their timestamps."""

    train: EventTable
    test_users: np.ndarray
    history: dict[int, np.ndarray]
    times: dict[int, np.ndarray]
    n_eligible: int

    def reveal(self, user: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(revealed, their timestamps, targets): the first n positives, then the rest."""
        items = self.history[user]
        return items[:n], self.times[user][:n], items[n:]


@dataclass(frozen=True)
class NextItemSplit:
    """Leave-one-out by time. Each evaluated user's last positive is their target and the one before
    it their `holdout` (a method may early-stop on it; it is in the user's history, never in
    `train`); `train` holds every other positive. `history[u]` are u's positives before the target
    and `times[u]` their timestamps, in time order; `targets[i]` is the target of `test_users[i]`."""

    train: EventTable
    holdout: EventTable
    test_users: np.ndarray
    targets: np.ndarray
    history: dict[int, np.ndarray]
    times: dict[int, np.ndarray]

    def capped(self, user: int, cap: int = HISTORY_CAP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(the last `cap` history items, their timestamps, the older ones that are masked only)."""
        items, times = self.history[user], self.times[user]
        cut = max(0, len(items) - cap)
        return items[cut:], times[cut:], items[:cut]


@dataclass(frozen=True)
class ReplaySplit:
    """Events strictly before the cut time train; the rest (time order) are replayed."""

    cut: int
    train: EventTable
    stream: EventTable


def _choose(pool: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """A sorted uniform sample without replacement of round(fraction * len(pool)) rows of pool."""
    size = int(np.floor(fraction * len(pool) + 0.5))
    return np.sort(rng.choice(pool, size=size, replace=False)) if size else pool[:0]


def item_cold_split(pos: EventTable, rng: np.random.Generator,
                    fraction: float = COLD_FRACTION) -> ItemColdSplit:
    """20% of the items with a positive become cold and all their positives leave training.

    Test users keep at least one positive in training and have at least one on a cold item.
    """
    pos = first_occurrences(pos)
    pool = np.unique(pos.item)
    cold = _choose(pool, rng, fraction)
    is_cold = np.isin(pos.item, cold)
    train = pos.take(~is_cold)
    test_pos = pos.take(is_cold)
    users = np.intersect1d(np.unique(train.user), np.unique(test_pos.user))
    targets = _group(test_pos, users)
    return ItemColdSplit(train, cold, users, targets, int(len(pool)))


def user_cold_split(pos: EventTable, rng: np.random.Generator, fraction: float = COLD_FRACTION,
                    min_positives: int = MIN_USER_POSITIVES) -> UserColdSplit:
    """Users with >= min_positives distinct positives are eligible; `fraction` of them are test users."""
    pos = first_occurrences(pos)
    users, counts = np.unique(pos.user, return_counts=True)
    eligible = users[counts >= min_positives]
    test = _choose(eligible, rng, fraction)
    train = pos.take(~np.isin(pos.user, test))
    test_pos = pos.take(np.isin(pos.user, test))
    return UserColdSplit(train, test, _group(test_pos, test), _group(test_pos, test, "timestamp"),
                         int(len(eligible)))


def next_item_split(pos: EventTable, min_positives: int = NEXT_ITEM_MIN_POSITIVES) -> NextItemSplit:
    """Users with >= min_positives distinct positives are evaluated on their last one (time order,
    ties in file order); the one before it is held out of training; everything else trains."""
    pos = first_occurrences(pos)
    order = np.lexsort((np.arange(len(pos)), pos.timestamp, pos.user))
    user = pos.user[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]])
    ends = np.r_[starts[1:], len(user)]
    eligible = (ends - starts) >= min_positives
    last, before = order[ends[eligible] - 1], order[ends[eligible] - 2]
    keep = np.ones(len(pos), bool)
    keep[last] = keep[before] = False
    history, times = {}, {}
    for s, e in zip(starts[eligible], ends[eligible]):
        rows = order[s:e - 1]
        history[int(user[s])], times[int(user[s])] = pos.item[rows], pos.timestamp[rows]
    return NextItemSplit(pos.take(keep), pos.take(np.sort(before)), pos.user[last], pos.item[last], history, times)


def next_item_validation(pos: EventTable, min_positives: int = NEXT_ITEM_MIN_POSITIVES) -> NextItemSplit:
    """The next-item split of the positives without the test targets: the validation target is
    the second-to-last positive, and no test target is seen."""
    test = next_item_split(pos, min_positives)
    pos = first_occurrences(pos)
    keys = pos.user * (int(pos.item.max(initial=0)) + 1) + pos.item
    target_keys = test.test_users * (int(pos.item.max(initial=0)) + 1) + test.targets
    return next_item_split(pos.take(~np.isin(keys, target_keys)), min_positives)


def replay_split(events: EventTable, quantile: float = REPLAY_QUANTILE) -> ReplaySplit:
    """Cut at the `quantile` of event times; `events` must already be in time order."""
    if len(events) == 0:
        raise ValueError("replay needs at least one event; got none")
    if np.any(np.diff(events.timestamp) < 0):
        raise ValueError("replay needs events in time order")
    cut = int(np.quantile(events.timestamp, quantile))
    before = events.timestamp < cut
    return ReplaySplit(cut, events.take(before), events.take(~before))


def item_cold_validation(pos: EventTable, rng: np.random.Generator) -> ItemColdSplit:
    """The item-cold split drawn again over the training positives of the seed's test split: new
    cold items among the warm ones, test users from the training part. `rng` continues after the
    test draw, so the validation split is fixed by the seed too."""
    return item_cold_split(item_cold_split(pos, rng).train, rng)


def user_cold_validation(pos: EventTable, rng: np.random.Generator) -> UserColdSplit:
    """The user-cold split drawn again over the training users of the seed's test split only."""
    return user_cold_split(user_cold_split(pos, rng).train, rng)


def replay_validation(events: EventTable, quantile: float = REPLAY_QUANTILE) -> ReplaySplit:
    """The replay split of the events before the real cut: cut again at the same quantile of
    them, and replay the pre-cut tail."""
    return replay_split(replay_split(events, quantile).train, quantile)


def check_split_kind(kind: str) -> None:
    """Raises ValueError unless `kind` is 'test' or 'validation'."""
    if kind not in SPLIT_KINDS:
        raise ValueError(f"split must be one of {', '.join(SPLIT_KINDS)}; got {kind!r}")


def _group(events: EventTable, users: np.ndarray, column: str = "item") -> dict[int, np.ndarray]:
    """One column (item rows by default) per user, in the (time) order of `events`."""
    keep = np.isin(events.user, users)
    user, item = events.user[keep], getattr(events, column)[keep]
    order = np.argsort(user, kind="stable")
    user, item = user[order], item[order]
    starts = np.searchsorted(user, users)
    ends = np.searchsorted(user, users, side="right")
    return {int(u): item[s:e] for u, s, e in zip(users, starts, ends)}

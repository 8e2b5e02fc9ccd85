"""Load a canonical dataset directory into the dense arrays the evaluation works on.

External string ids stay at this edge: items become rows in catalog order, users rows in sorted id
order, and every later module speaks rows only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.text.catalog import read_events, read_items, read_table, table_files
from engine.types import Item


class DatasetError(ValueError):
    """A dataset directory breaks the canonical layout; the message names the rule."""


@dataclass(frozen=True)
class EventTable:
    """Events as parallel arrays, each of shape (n,): user and item rows (int64), timestamp (int64,
    unix seconds) and value (float64)."""

    user: np.ndarray
    item: np.ndarray
    timestamp: np.ndarray
    value: np.ndarray

    def __len__(self) -> int:
        return int(self.user.shape[0])

    def take(self, index: np.ndarray) -> EventTable:
        """The rows selected by a boolean mask or an integer index, in that order."""
        return EventTable(self.user[index], self.item[index], self.timestamp[index], self.value[index])


@dataclass(frozen=True)
class EvalDataset:
    """A catalog and its events. Row i of `item_ids` is `items[i]`; `events` are in time order."""

    name: str
    items: tuple[Item, ...]
    item_ids: np.ndarray
    user_ids: np.ndarray
    events: EventTable
    profiles: dict[str, str] = field(default_factory=dict)
    dropped_events: int = 0

    @property
    def n_items(self) -> int:
        return len(self.items)

    @property
    def n_users(self) -> int:
        return int(self.user_ids.shape[0])

    def profile(self, user_row: int) -> str | None:
        """The user's sign-up profile text, or None when the dataset has none for them."""
        return self.profiles.get(str(self.user_ids[user_row])) or None

    def profiles_of(self, events: EventTable) -> dict[str, str]:
        """External id -> profile text of the users who have an event in `events`."""
        if not self.profiles:
            return {}
        ids = (str(u) for u in self.user_ids[np.unique(events.user)])
        return {u: self.profiles[u] for u in ids if self.profiles.get(u)}


def positives(events: EventTable, min_value: float | None) -> EventTable:
    """Events with value >= min_value (all events when min_value is None), time order kept."""
    if min_value is None:
        return events
    return events.take(events.value >= min_value)


def first_occurrences(events: EventTable) -> EventTable:
    """One event per (user, item) pair, the earliest; time order kept."""
    keys = events.user * (int(events.item.max(initial=0)) + 1) + events.item
    _, first = np.unique(keys, return_index=True)
    return events.take(np.sort(first))


def load_dataset(path: str | Path) -> EvalDataset:
    """Read `items.*`, `events.*` and the optional `users.*` (Parquet, CSV or JSONL) from a directory.

    Events on items missing from the catalog are dropped (their count is kept in `dropped_events`).

    Raises:
        DatasetError: the directory or a table breaks the canonical layout.
    """
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"a dataset must be a directory holding items.* and events.*; got {root}")
    try:
        items = tuple(read_items(_table_file(root, "items")))
        raw_events = read_events(_table_file(root, "events"))
    except DatasetError:
        raise
    except (ValueError, KeyError, OSError) as exc:
        raise DatasetError(f"{root}: {exc}") from exc
    if not items:
        raise DatasetError(f"{root}: items table must hold at least one item")
    item_ids = np.array([it.item_id for it in items], dtype=object)
    users, events, dropped = _event_arrays(item_ids, raw_events)
    profiles = _read_profiles(root)
    return EvalDataset(root.name, items, item_ids, users, events, profiles, dropped)


def _table_file(root: Path, stem: str, required: bool = True) -> Path | None:
    found = table_files(root, stem)
    if len(found) > 1:
        raise DatasetError(f"{root}: exactly one {stem}.parquet|csv|jsonl allowed; found {[p.name for p in found]}")
    if not found and required:
        raise DatasetError(f"{root}: a dataset needs {stem}.parquet, {stem}.csv or {stem}.jsonl")
    return found[0] if found else None


def _event_arrays(item_ids: np.ndarray, raw_events: list) -> tuple[np.ndarray, EventTable, int]:
    """Rows for known items only, sorted by time (stable, so ties keep file order)."""
    row_of = {item_id: row for row, item_id in enumerate(item_ids)}
    known = [e for e in raw_events if e.item_id in row_of]
    user_ids = np.array(sorted({e.user_id for e in known}), dtype=object)
    user_row = {u: row for row, u in enumerate(user_ids)}
    n = len(known)
    table = EventTable(
        np.fromiter((user_row[e.user_id] for e in known), dtype=np.int64, count=n),
        np.fromiter((row_of[e.item_id] for e in known), dtype=np.int64, count=n),
        np.fromiter((_timestamp(e) for e in known), dtype=np.int64, count=n),
        np.fromiter((e.value for e in known), dtype=np.float64, count=n),
    )
    order = np.argsort(table.timestamp, kind="stable")
    return user_ids, table.take(order), len(raw_events) - n


def _timestamp(event) -> int:
    if event.timestamp is None:
        raise DatasetError(f"every event needs a timestamp (int64 unix seconds); "
                           f"user {event.user_id!r} item {event.item_id!r} has none")
    return int(event.timestamp)


def _read_profiles(root: Path) -> dict[str, str]:
    path = _table_file(root, "users", required=False)
    if path is None:
        return {}
    try:
        table = read_table(path, string_columns=("user_id", "profile"))
    except ValueError as exc:
        raise DatasetError(str(exc)) from exc
    missing = {"user_id", "profile"} - set(table.column_names)
    if missing:
        raise DatasetError(f"{path}: users table needs columns user_id and profile; missing {sorted(missing)}")
    ids, texts = table.column("user_id").to_pylist(), table.column("profile").to_pylist()
    return {str(u): str(t) for u, t in zip(ids, texts) if u is not None and t}


def write_sample(source: str | Path, dest: str | Path, n_users: int, max_items: int | None = None) -> Path:
    """Write a small canonical dataset: the events of the first `n_users` users (in the order they
    first appear in the events table), on the items they touched, as Parquet. With `max_items`, only
    the most-touched items of those users are kept. For quick runs and tests.

    Raises:
        DatasetError: the source is not a canonical dataset.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    src, out = Path(source), Path(dest)
    items = read_table(_table_file(src, "items"), string_columns=("item_id",))
    events = read_table(_table_file(src, "events"), string_columns=("user_id", "item_id"))
    users = list(dict.fromkeys(events.column("user_id").to_pylist()))[:n_users]
    events = events.filter(pc.is_in(events.column("user_id"), value_set=pa.array(users)))
    counts = pc.value_counts(events.column("item_id")).to_pylist()
    counts.sort(key=lambda c: (-c["counts"], c["values"]))
    keep = pa.array([c["values"] for c in counts[:max_items]])
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(items.filter(pc.is_in(items.column("item_id"), value_set=keep)), out / "items.parquet")
    pq.write_table(events.filter(pc.is_in(events.column("item_id"), value_set=keep)), out / "events.parquet")
    return out

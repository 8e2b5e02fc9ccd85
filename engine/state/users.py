"""User state: a vector in retrieval space, click/skip history, and the per-event update rule."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from ..vectors import normalise
from .vocab import Vocabulary


@dataclass
class UserState:
    """One user. `vector` is zero while the user has neither a profile nor a click."""

    vector: np.ndarray
    clicks: list[int] = field(default_factory=list)
    skips: list[int] = field(default_factory=list)
    impressions: int = 0
    profile: str | None = None
    profile_vec: np.ndarray | None = None  # raw text-space vector of the profile, for re-projection
    held: list[int] = field(default_factory=list)  # rows recorded while the store was frozen: seen only
    dislikes: list[int] = field(default_factory=list)  # rows never to show this user again

    @property
    def count(self) -> int:
        return len(self.clicks)

    def prior(self, profile_weight: float = 1.0) -> float:
        """Pseudo-count of the profile in the vector: `profile_weight` clicks' worth (what `fit`
        learns from the training users' profiles, `Ranker.profile_weight`), 0 without one."""
        return profile_weight if self.profile_vec is not None else 0.0

    def seen(self) -> set[int]:
        """Rows the user clicked, skipped, disliked, or acted on while the store was frozen (a new
        set each call: a reader keeps nothing)."""
        return set(self.clicks) | set(self.skips) | set(self.held) | set(self.dislikes)

    def recent(self, window: int) -> list[int]:
        return self.clicks[-window:]


def click_step(user: UserState, min_step: float, profile_weight: float = 1.0) -> float:
    """Big steps while cold (a running mean, the profile counting `profile_weight` clicks), never
    below `min_step` once warm."""
    return max(1.0 / (user.count + user.prior(profile_weight) + 1), min_step)


def apply_click(user: UserState, item_vec: np.ndarray, min_step: float, profile_weight: float = 1.0) -> None:
    """u <- normalise(u + eta * (v - u)), eta from `click_step` (before the click is counted)."""
    eta = click_step(user, min_step, profile_weight)
    if not user.vector.any():
        user.vector = normalise(item_vec)
    else:
        user.vector = normalise(user.vector + eta * (item_vec - user.vector))


def apply_skip(user: UserState, item_vec: np.ndarray, min_step: float, skip_step: float,
               profile_weight: float = 1.0) -> None:
    """A skip pushes the vector a little away from the item (nothing to push when it is zero)."""
    if user.vector.any():
        eta = click_step(user, min_step, profile_weight) * skip_step
        user.vector = normalise(user.vector - eta * item_vec)


def apply_dislike(user: UserState, item_vec: np.ndarray, min_step: float, dislike_step: float,
                  profile_weight: float = 1.0) -> None:
    """A strong skip: the vector moves `dislike_step` times a click's step away from the item."""
    apply_skip(user, item_vec, min_step, dislike_step, profile_weight)


def rederive(user: UserState, item_vecs: np.ndarray, profile_vec: np.ndarray | None,
             min_step: float, skip_step: float, dislike_step: float = 1.0, profile_weight: float = 1.0) -> None:
    """Rebuild the vector from the profile and the history, e.g. after the item space changed.

    `item_vecs` holds the retrieval vectors of `user.clicks + user.skips + user.dislikes`, in that
    order; the events are replayed in click order with skips, then dislikes, last (their
    relative order was not kept).
    """
    clicks, skips = list(user.clicks), list(user.skips)
    dim = item_vecs.shape[1]
    fresh = UserState(vector=np.zeros(dim, np.float32) if profile_vec is None else normalise(profile_vec),
                      profile=user.profile, profile_vec=user.profile_vec)
    for j, row in enumerate(clicks):
        apply_click(fresh, item_vecs[j], min_step, profile_weight)
        fresh.clicks.append(row)
    for j in range(len(skips)):
        apply_skip(fresh, item_vecs[len(clicks) + j], min_step, skip_step, profile_weight)
    for j in range(len(user.dislikes)):
        apply_dislike(fresh, item_vecs[len(clicks) + len(skips) + j], min_step, dislike_step, profile_weight)
    user.vector = fresh.vector


class UserTable:
    """All users, addressed by external id."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.vocab = Vocabulary()
        self.states: list[UserState] = []

    def __len__(self) -> int:
        return len(self.states)

    def get(self, user_id: str) -> UserState | None:
        row = self.vocab.row(user_id)
        return None if row is None else self.states[row]

    def get_or_create(self, user_id: str) -> UserState:
        row = self.vocab.add(user_id)
        if row == len(self.states):
            self.states.append(UserState(vector=np.zeros(self.dim, np.float32)))
        return self.states[row]


#: The users table of a snapshot (users-G.parquet), row r the user of vocabulary row r.
USER_SCHEMA = pa.schema([
    ("user_id", pa.string()), ("clicks", pa.list_(pa.int64())), ("skips", pa.list_(pa.int64())),
    ("impressions", pa.int64()), ("profile", pa.string()), ("held", pa.list_(pa.int64())),
    ("dislikes", pa.list_(pa.int64())),
])
#: Columns a store written by an earlier version may lack (read as empty).
OPTIONAL_USER_COLUMNS = ("held", "dislikes")


def users_to_arrow(users: UserTable) -> pa.Table:
    s = users.states
    return pa.Table.from_arrays([
        users.vocab.to_arrow(), pa.array([u.clicks for u in s], pa.list_(pa.int64())),
        pa.array([u.skips for u in s], pa.list_(pa.int64())), pa.array([u.impressions for u in s], pa.int64()),
        pa.array([u.profile for u in s], pa.string()), pa.array([u.held for u in s], pa.list_(pa.int64())),
        pa.array([u.dislikes for u in s], pa.list_(pa.int64())),
    ], schema=USER_SCHEMA)


def user_arrays(users: UserTable, d_text: int) -> dict[str, np.ndarray]:
    n = len(users)
    vecs = np.zeros((n, users.dim), np.float32)
    prof = np.zeros((n, d_text), np.float32)
    for r, u in enumerate(users.states):
        vecs[r] = u.vector
        if u.profile_vec is not None:
            prof[r] = u.profile_vec
    return {"user_vectors": vecs, "user_profiles": prof}


def users_from_arrow(table: pa.Table, vecs: np.ndarray, profiles: np.ndarray) -> UserTable:
    users = UserTable(vecs.shape[1] if vecs.ndim == 2 else 0)
    users.vocab = Vocabulary.from_arrow(table.column("user_id"))  # row r is table row r
    cols = table.to_pydict()
    for r, uid in enumerate(cols["user_id"]):
        state = users.get_or_create(uid)
        state.vector = vecs[r].copy()
        state.clicks, state.skips = list(cols["clicks"][r]), list(cols["skips"][r])
        state.impressions = int(cols["impressions"][r])
        state.profile = cols["profile"][r]
        state.profile_vec = profiles[r].copy() if state.profile is not None else None
        state.held = list(cols["held"][r]) if "held" in cols else []
        state.dislikes = list(cols["dislikes"][r]) if "dislikes" in cols else []
    return users


def check_item_rows(table: pa.Table, n_items: int) -> None:
    """Histories (a users table's list columns) may only name item rows that exist: ValueError."""
    import pyarrow.compute as pc

    for col in [c for c in ("clicks", "skips", "held", "dislikes") if c in table.column_names]:
        flat = pc.list_flatten(table.column(col))
        if len(flat) and (pc.min(flat).as_py() < 0 or pc.max(flat).as_py() >= n_items):
            raise ValueError(f"column {col!r} names item rows outside 0..{n_items - 1}")


"""User state: a vector in retrieval space, click/skip history, and the per-event update rule."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

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

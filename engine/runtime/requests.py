"""Recommendation requests against a Core, once their arguments are checked (engine/engine.py):
the user they rank for (stored, new with a profile, or a stateless history), under the read lock
(the write lock when a cache must be rebuilt first: Core.read)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import replace

from ..types import Recommendation
from . import queries, writes
from .core import Core


def recommend(core: Core, user_id: str, q: queries.Query, profile: str | None,
              history: Sequence[str] | None) -> list[Recommendation]:
    """`Engine.recommend`: a writable store saves a new profile first (`set_profile`); a read-only
    one ranks for it unsaved; `history` ranks for a transient user and records nothing."""
    profile_vec = None
    if history is not None:
        profile_vec = None if profile is None else writes.encode(core, [profile])[0]
    elif profile is not None:
        with core.lock.read():
            user = core.state.users.get(user_id) if core.state is not None else None
        if not core.read_only and (user is None or user.profile != profile):
            core.check_writable()
            writes.set_profile(core, user_id, profile)
        elif core.read_only and user is None:  # a new user's profile, used unsaved
            profile_vec = writes.encode(core, [profile])[0]

    def answer(refresh: bool) -> list[Recommendation]:
        st = core.state
        if st is None or st.index is None:
            return []
        if history is not None:
            user = queries.history_user(st, history, profile, profile_vec)
        else:
            user = queries.stored_or_new_user(st, user_id, profile, profile_vec)
        return queries.ranked(st, user, user_id, replace(q, now=int(time.time())), refresh)

    return core.read(answer)


def recommend_many(core: Core, user_ids: Sequence[str], q: queries.Query) -> list[list[Recommendation]]:
    """`Engine.recommend_many`: every user's ANN candidates from one batched search."""

    def answer(refresh: bool) -> list[list[Recommendation]]:
        st = core.state
        if st is None or st.index is None:
            return [[] for _ in user_ids]
        users = [queries.stored_or_new_user(st, u, None, None) for u in user_ids]
        return queries.ranked_many(st, users, user_ids, replace(q, now=int(time.time())), refresh)

    return core.read(answer)

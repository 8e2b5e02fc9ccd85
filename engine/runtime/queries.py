"""The read path of a request: the user it ranks for, the rows it may return, the ranked list.

Each function reads `State` and builds what it needs per call; the caller holds a lock (see
Core.read). Ids are turned into rows here and back into ids with titles on the way out.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import InvalidInputError, UnknownItemError
from ..serving.explain import reasons
from ..serving.filters import Filter, allowed_rows, check_exclude, check_filter
from ..state.users import UserState
from ..types import Because, Recommendation
from .state import State


def stored_or_new_user(state: State, user_id: str, profile: str | None,
                       profile_vec: np.ndarray | None) -> UserState:
    """The stored user, or a new one (seeded by `profile_vec`, the profile's text vector)."""
    user = state.users.get(user_id)
    if user is None:
        user = UserState(vector=np.zeros(state.proj.d_out, np.float32))
        if profile_vec is not None:
            user.profile, user.profile_vec = profile, profile_vec
            user.vector = state.proj.transform(profile_vec[None])[0]
    return user


def history_user(state: State, history: Sequence[str], profile: str | None,
                 profile_vec: np.ndarray | None) -> UserState:
    """A transient user whose clicks are `history` (item ids, oldest first; all must be live)."""
    rows = []
    for item_id in history:
        row = state.items.live_row(item_id)
        if row is None:
            raise UnknownItemError(f"history names item {item_id!r}, which is not a live item")
        rows.append(row)
    return state.ranker.transient_user(rows, profile, profile_vec)


@dataclass(frozen=True)
class Query:
    """What a request asks for, as the facade checked it (see Engine.recommend).

    `now` (unix seconds) is the time items' `expires_at` is compared with; None: never expire.
    """

    k: int
    exclude_seen: bool = True
    candidates: Sequence[str] | None = None
    exclude: Iterable[str] | None = None
    filter: Filter | None = None
    explain: bool = False
    diversity: float = 0.0
    now: int | None = None


def ranked(state: State, user: UserState, user_id: str, q: Query, refresh: bool) -> list[Recommendation]:
    """The top q.k for `user`, of `q.candidates` (ids; default: the ranker's candidates), within
    the rules of `q.filter` and not expired at `q.now`; with `q.explain`, each says why."""
    banned = banned_rows(state, user, q.exclude_seen, q.exclude)
    allowed = allowed_rows(state.items, q.filter, q.now)
    cand_rows = None if q.candidates is None else candidate_rows(state, q.candidates, banned, allowed)
    rows, scores = state.ranker.rank(user, state.index, q.k, banned, cand_rows, user_key=user_id, refresh=refresh,
                                     allowed=allowed, diversity=q.diversity)
    return as_recommendations(state, rows, scores, reasons(state.items, user, rows) if q.explain else None)


def ranked_many(state: State, users: list[UserState], user_ids: Sequence[str], q: Query,
                refresh: bool) -> list[list[Recommendation]]:
    """`ranked` for several users (`q.candidates` and `q.exclude` unused), their ANN candidates
    from one batched FAISS search."""
    banned = [banned_rows(state, u, q.exclude_seen, None) for u in users]
    allowed = allowed_rows(state.items, q.filter, q.now)
    ann = state.ranker.search_many(users, state.index, banned, q.k, allowed)
    out = []
    for user, user_id, b, a in zip(users, user_ids, banned, ann):
        rows, scores = state.ranker.rank(user, state.index, q.k, b, None, user_key=user_id, refresh=refresh,
                                         allowed=allowed, ann=a, diversity=q.diversity)
        out.append(as_recommendations(state, rows, scores, reasons(state.items, user, rows) if q.explain else None))
    return out


def similar(state: State, row: int, k: int, now: int | None = None, flt: Filter | None = None,
            exclude: Iterable[str] = ()) -> list[Recommendation]:
    """The k live items nearest item `row` in retrieval space, within the rules of `flt`: not
    itself, nor `exclude` (ids), nor those expired at `now`. Both act inside the search, so k
    items come back whenever k qualify."""
    banned = np.fromiter({row} | id_rows(state, exclude), dtype=np.int64)
    rows, scores = state.index.search(state.ranker.space.similar_query(row), k, exclude=banned,
                                      allowed=allowed_rows(state.items, flt, now))
    return as_recommendations(state, rows, scores)


def as_recommendations(state: State, rows: np.ndarray, scores: np.ndarray,
                       because: list[Because] | None = None) -> list[Recommendation]:
    """Rows and scores as Recommendations (ids, titles; `because` in the same order, if given)."""
    why = because if because is not None else [None] * len(rows)
    return [Recommendation(state.items.vocab.id(r), float(s), state.items.titles[r], b)
            for r, s, b in zip(rows, scores, why)]


def banned_rows(state: State, user: UserState, exclude_seen: bool, exclude: Iterable[str] | None) -> np.ndarray:
    """Rows a request must not return: the user's seen items (when asked), the disliked ones
    (always) and `exclude` (ids)."""
    rows = (user.seen() if exclude_seen else set(user.dislikes)) | id_rows(state, exclude or ())
    return np.fromiter(rows, dtype=np.int64, count=len(rows))


def id_rows(state: State, ids: Iterable[str]) -> set[int]:
    """The rows of `ids` (item ids; unknown ones ignored)."""
    rows = (state.items.vocab.row(i) for i in ids)
    return {r for r in rows if r is not None}


def candidate_rows(state: State, candidates: Sequence[str], banned: np.ndarray,
                   allowed: np.ndarray | None = None) -> np.ndarray:
    """The live rows of `candidates` (ids; unknown and removed ones ignored), less `banned`,
    and only those `allowed` lets through (bool by row) when given."""
    rows = [state.items.live_row(i) for i in candidates]
    arr = np.array([r for r in rows if r is not None], dtype=np.int64)
    if allowed is not None:
        arr = arr[allowed[arr]]
    return np.setdiff1d(arr, banned) if len(banned) else np.unique(arr)


def make_query(k: int, exclude_seen: bool, candidates: Sequence[str] | None, exclude: Iterable[str] | None,
               flt: Filter | None, explain: bool, diversity: float) -> Query:
    """A request's options, checked against their rules (the message names the rule broken)."""
    check_k(k)
    if isinstance(diversity, bool) or not isinstance(diversity, (int, float)) or not 0.0 <= diversity <= 1.0:
        raise InvalidInputError(f"diversity must be a number between 0 and 1; got {diversity!r}")
    return Query(k, exclude_seen, candidates, check_exclude(exclude), check_filter(flt), bool(explain),
                 float(diversity))


def check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > 10_000:
        raise InvalidInputError(f"k must be an integer between 1 and 10000; got {k!r}")

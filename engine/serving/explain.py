"""Why each item of a list is there: the click or profile it is nearest to, popularity, or newness.

The explanation reads the text vectors (the space a person can check: two texts alike), not the
reranker's weights: it says what the item is near, which is what the candidates were drawn by.
"""

from __future__ import annotations

import numpy as np

from ..state.items import ItemTable
from ..state.users import UserState
from ..types import Because

#: Below this cosine of text vectors an item is not said to be near a click or the profile; it is
#: explained by its popularity, or as new. (all-MiniLM-L6-v2 puts unrelated titles under ~0.2.)
MIN_COSINE = 0.3
#: The explanation looks at this many of the user's latest distinct clicks.
CLICKS_LOOKED_AT = 50


def reasons(items: ItemTable, user: UserState, rows: np.ndarray) -> list[Because]:
    """One Because per row of `rows` (item rows of a list), for `user`."""
    vecs = items.vector_rows(rows)
    best = np.full(len(rows), -np.inf, np.float32)
    source = np.full(len(rows), -1, np.int64)  # the clicked row each item is nearest to; -1: profile
    clicks = np.array(list(dict.fromkeys(user.clicks[::-1]))[:CLICKS_LOOKED_AT], np.int64)
    if len(clicks):
        sims = vecs @ items.vector_rows(clicks).T
        source, best = clicks[sims.argmax(axis=1)], sims.max(axis=1)
    if user.profile_vec is not None:
        prof = vecs @ user.profile_vec
        nearer = prof > best
        best, source = np.where(nearer, prof, best), np.where(nearer, -1, source)
    out = []
    for j, r in enumerate(rows):
        if best[j] >= MIN_COSINE:
            out.append(Because("profile", float(best[j])) if source[j] < 0 else
                       Because("clicked", float(best[j]), items.vocab.id(int(source[j]))))
        elif items.clicks[r] > 0:
            out.append(Because("popular", float(items.clicks[r])))
        else:
            out.append(Because("new item", float(items.added_at[r])))
    return out


__all__ = ["MIN_COSINE", "reasons"]

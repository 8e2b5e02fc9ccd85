"""The reranker's raw inputs for a user's candidates (models/rerank.FEATURES, by name).

Each is computed for the whole candidate list at once: the tower score, the lexical (TF-IDF)
cosine to the user's clicks, co-clicks and item-CF with the recent clicks, clicks, CTR,
similarity to the recent clicks, profile similarity and freshness. `models/rerank.expand`
standardises them per request and places them in the user's bucket.
"""

from __future__ import annotations

import numpy as np

from ..config import Config
from ..models.rerank import FEATURES, N_FEATURES
from ..state.coclick import CoClicks
from ..state.lexical import Lexicon
from ..state.users import UserState
from .space import RetrievalSpace

#: The lexical profile is the mean TF-IDF vector of this many of the user's latest clicks.
LEXICAL_HISTORY = 50
#: Weight of a recent click in the co-click features, per click since: the item clicked last says
#: most about what comes next (1.0 weighs the last `recent_window` clicks alike). On the next-item
#: validation split of amazon-office, 1.0 / 0.5 / 0.25 gave NDCG@10 0.117 / 0.125 / 0.122.
RECENCY_DECAY = 0.5
_COL = {name: i for i, name in enumerate(FEATURES)}


class Features:
    """Reads the features of candidates from the space, the item counts, co-clicks and lexicon."""

    def __init__(self, config: Config, space: RetrievalSpace, coclicks: CoClicks, lexicon: Lexicon) -> None:
        self.config, self.space, self.coclicks, self.lexicon = config, space, coclicks, lexicon

    def recent(self, user: UserState) -> list[int]:
        """The user's last `recent_window` clicks, each once (the co-click sources)."""
        return list(dict.fromkeys(user.recent(self.config.recent_window)))

    def pair_times(self, user: UserState, row: int) -> np.ndarray:
        """Per item of `recent(user)` (the user as they stood before a click on `row`), how many
        co-click pairs with `row` that click added: `CoClicks.add_click` pairs it once with each
        of the window's previous clicks."""
        paired = np.array(user.clicks[-self.coclicks.window:], np.int64)
        recent = np.array(self.recent(user), np.int64)
        return (recent[:, None] == paired[None, :]).sum(1) * (recent != row)

    def raw(self, user: UserState, rows: np.ndarray, profile_weight: float, as_cold: bool = False,
            own_clicks: np.ndarray | None = None, before_click: int | None = None) -> np.ndarray:
        """Shape (len(rows), N_FEATURES) float32; see rerank.FEATURES for the columns.

        `profile_weight`: the clicks a profile counts for (the tower score's temperature reads
        the user's history length). `as_cold` shows the items as if they had just been added
        (text-only vector and bias, no clicks): training uses it so the reranker also learns to
        rank items without feedback. `own_clicks` is what the user's own later clicks added to
        the click counts; training subtracts it, and trains on co-clicks counted without its
        users (see Engine.fit), so that no feature reveals its label. `before_click`: the
        features as they stood before `user` (as they stood then) clicked that row, whose click
        has been applied since: its count, impression and co-click pairs taken out (the online
        step reads them so, after the click).
        """
        space = self.space
        items, proj = space.items, space.projection
        if before_click is not None:
            own_clicks = (rows == before_click).astype(np.float64)
        if as_cold and space.trained:
            raw = items.vector_rows(rows)
            v, bias = proj.transform(raw), proj.bias(raw)
        else:
            v, bias = space.scoring_vectors(rows), space.bias[rows]
        f = np.zeros((len(rows), N_FEATURES), np.float32)
        f[:, _COL["tower"]] = proj.tau_for(user.count + user.prior(profile_weight)) * (v @ user.vector) + bias
        history = list(dict.fromkeys(user.clicks[-LEXICAL_HISTORY:]))
        f[:, _COL["lexical"]] = self.lexicon.similarity(np.array(history, np.int64), rows)
        clicks = items.clicks[rows] if own_clicks is None else np.maximum(items.clicks[rows] - own_clicks, 0)
        if as_cold:
            clicks = np.zeros(len(rows))
        f[:, _COL["clicks"]] = np.log1p(clicks)
        impressions = items.impressions[rows] if own_clicks is None else items.impressions[rows] - own_clicks
        impressions = np.zeros(len(rows)) if as_cold else np.maximum(impressions, clicks)
        f[:, _COL["ctr"]] = (clicks + 1.0) / (impressions + 2.0)
        recent = self.recent(user)
        if recent:
            f[:, _COL["recent"]] = (v @ space.scoring_vectors(np.array(recent)).T).max(axis=1)
        if recent and not as_cold:
            age = np.arange(len(recent) - 1, -1, -1)
            decay = RECENCY_DECAY ** age
            weights = np.stack([decay, decay / np.sqrt(1.0 + items.clicks[recent])])
            co, cf = self.coclicks.scores(recent, rows, weights)
            if before_click is not None:  # the pairs the click made with the clicks before it
                times = self.pair_times(user, before_click)
                at = rows == before_click
                co, cf = np.maximum(co - at * (weights[0] @ times), 0), np.maximum(cf - at * (weights[1] @ times), 0)
            f[:, _COL["cooc"]] = np.log1p(co)
            f[:, _COL["itemcf"]] = cf / np.sqrt(1.0 + clicks)
        if user.profile_vec is not None:
            f[:, _COL["profile"]] = items.vector_rows(rows) @ user.profile_vec
        f[:, _COL["fresh"]] = clicks == 0
        return f

    def text_match(self, user: UserState, rows: np.ndarray) -> np.ndarray:
        """How well the text of `rows` matches the user: the lexical (TF-IDF) cosine to the user's
        clicked items, the reranker's `lexical` input; for a user without clicks, the cosine of
        the item's vector to the user's (the profile's)."""
        history = list(dict.fromkeys(user.clicks[-LEXICAL_HISTORY:]))
        if history:
            return self.lexicon.similarity(np.array(history, np.int64), rows)
        return self.space.scoring_vectors(rows) @ user.vector


__all__ = ["Features", "LEXICAL_HISTORY", "RECENCY_DECAY"]

"""LightFM's user split, on hand-made data with answers worked out here."""

from __future__ import annotations

import numpy as np
import pytest

from engine.evaluation.baselines.base import TrainSet
from engine.evaluation.baselines.hybrid import LightFMMethod, split_history
from engine.evaluation.datasets import EventTable
from engine.types import Item


def _train(histories: list[list[int]], n_items: int, titles: list[str] | None = None) -> TrainSet:
    """One positive per (user, item) in list order (timestamps ascending); items titled by `titles`."""
    users = [u for u, h in enumerate(histories) for _ in h]
    items = [i for h in histories for i in h]
    n = len(items)
    events = EventTable(np.array(users, dtype=np.int64), np.array(items, dtype=np.int64),
                        np.arange(n, dtype=np.int64), np.ones(n))
    names = titles or [f"item {i}" for i in range(n_items)]
    catalog = tuple(Item(str(i), names[i]) for i in range(n_items))
    user_ids = np.array([f"u{u}" for u in range(len(histories))], dtype=object)
    return TrainSet(events, catalog, len(histories), user_ids)


def test_split_history_is_disjoint_and_complete(rng: np.random.Generator) -> None:
    from scipy.sparse import csr_matrix

    dense = (rng.random((30, 40)) < 0.2).astype(np.float32)
    dense[0], dense[1] = 0, 0
    dense[1, 5] = 1  # a user with one positive; user 0 has none
    m = csr_matrix(dense)
    features, targets = split_history(m, np.random.default_rng(0))
    assert features.multiply(targets).nnz == 0
    assert (features + targets != m).nnz == 0
    n = np.diff(m.indptr)
    assert (np.diff(features.indptr) == n // 2).all() and (np.diff(targets.indptr) == n - n // 2).all()
    assert features[1].nnz == 0 and targets[1, 5] == 1
    again, _ = split_history(m, np.random.default_rng(0))
    other, _ = split_history(m, np.random.default_rng(1))
    assert (again != features).nnz == 0 and (other != features).nnz > 0


def test_lightfm_trains_no_user_on_an_item_in_its_features(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightfm import LightFM

    seen = {}
    fit = LightFM.fit

    def spy(self, interactions, **kwargs):
        seen["interactions"], seen["users"] = interactions.tocsr(), kwargs["user_features"].tocsr()
        return fit(self, interactions, **kwargs)

    monkeypatch.setattr(LightFM, "fit", spy)
    histories = [[0, 1, 2, 3], [1, 2, 4], [2, 5], [3], [0, 4, 5, 1, 2]]
    LightFMMethod(user_features="history", epochs=1, no_components=4).fit(_train(histories, 6))
    interactions, users = seen["interactions"], seen["users"]
    for u, history in enumerate(histories):
        trained, featured = set(interactions[u].indices), set(users[u].indices)
        assert not trained & featured, (u, trained, featured)
        assert trained | featured == set(history) and len(featured) == len(history) // 2

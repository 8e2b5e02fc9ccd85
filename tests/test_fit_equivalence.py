"""`fit`'s faster paths compute what the straightforward ones did; a seed gives the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Config, Engine
from engine.training.fit import fit_threads
from engine.training.towers import _examples

from conftest import FakeEncoder
from test_fit import catalog, clicks


def reference_examples(histories: list[np.ndarray], rng: np.random.Generator, max_hist: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """towers._examples as first written: one np.delete, choice and pad per click."""
    targets, hists, lens = [], [], []
    for h in histories:
        for j in range(len(h)):
            others = np.delete(h, j)
            m = int(rng.integers(0, min(len(others), max_hist) + 1))
            pick = rng.choice(others, size=m, replace=False) if m else others[:0]
            targets.append(h[j])
            hists.append(np.pad(pick, (0, max_hist - m), constant_values=-1))
            lens.append(m)
    order = rng.permutation(len(targets))
    return (np.asarray(targets, np.int64)[order], np.asarray(hists, np.int64).reshape(-1, max_hist)[order],
            np.asarray(lens, np.int64)[order])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_hist", [1, 3, 30])
def test_tower_examples_match_the_reference_draw_for_draw(seed: int, max_hist: int) -> None:
    rng = np.random.default_rng(seed)
    # lengths on both sides of max_hist, where the number drawn stops growing with the history
    histories = [rng.choice(20_000, size=int(n), replace=False).astype(np.int64)
                 for n in [2, 3, max_hist, max_hist + 1, max_hist + 2, *rng.integers(2, 60, 20)]]
    got = _examples(histories, np.random.default_rng(seed + 10), max_hist)
    want = reference_examples(histories, np.random.default_rng(seed + 10), max_hist)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_fit_threads_are_set_inside_and_given_back() -> None:
    before = torch.get_num_threads()
    assert Config().fit_threads == 1
    with fit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with fit_threads(0):  # 0: as they are
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="fit_threads must be >= 0"):
        Config(fit_threads=-1)


def _fitted(path: Path) -> tuple[dict[str, np.ndarray], dict[str, list[str]], int]:
    cfg = Config(proj_epochs=1, proj_dim=16, rerank_epochs=2, fsync=False, seed=7)
    events = clicks(users=120, per_user=5)  # 120 users: enough for a reranker holdout
    eng = Engine.create(path, cfg, encoder=FakeEncoder(dim=32))
    eng.add_items(catalog())
    eng.import_events(events)
    threads = torch.get_num_threads()
    summary = eng.fit(events, progress=False)
    assert summary["projection"] and summary["reranker"]
    assert torch.get_num_threads() == threads  # fit gave the caller's thread count back
    st = eng._state  # noqa: SLF001 - the trained weights themselves
    weights = {k: np.array(v) for k, v in st.ranker.model_tensors(st.proj).items()}
    lists = {f"u{u}": [r.item_id for r in eng.recommend(f"u{u}", k=8)] for u in range(0, 120, 7)}
    eng.close(save=False)
    return weights, lists, len(weights)


def test_the_same_seed_fits_the_same_weights_bit_for_bit(tmp_path: Path) -> None:
    w1, lists1, n = _fitted(tmp_path / "a")
    w2, lists2, _ = _fitted(tmp_path / "b")
    assert n > 5 and sorted(w1) == sorted(w2)
    for name in w1:
        np.testing.assert_array_equal(w1[name], w2[name], err_msg=name)
    assert lists1 == lists2

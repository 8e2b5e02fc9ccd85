"""Co-click counts: offline build, online growth, the training-time subtraction, and restarts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engine import Config, Engine, Item
from engine.state.coclick import CoClicks

from conftest import FakeEncoder


def brute_force(histories: list[list[int]], window: int, n: int) -> np.ndarray:
    c = np.zeros((n, n))
    for h in histories:
        for b in range(len(h)):
            for a in range(max(0, b - window), b):
                if h[a] != h[b]:
                    c[h[a], h[b]] += 1
                    c[h[b], h[a]] += 1
    return c


def test_build_and_online_clicks_count_the_same_pairs() -> None:
    rng = np.random.default_rng(0)
    histories = [list(rng.integers(0, 12, size=int(rng.integers(1, 15)))) for _ in range(20)]
    ref = brute_force(histories, 3, 12)
    built = CoClicks(window=3)
    built.build(histories, 12)
    online = CoClicks(window=3)
    online.build([], 12)
    for h in histories:
        for t, row in enumerate(h):
            online.add_click(h[:t], row)
    rows = np.arange(12)
    for j in range(12):
        np.testing.assert_array_equal(built.scores([j], rows), ref[j])
        np.testing.assert_array_equal(online.scores([j], rows), ref[j])
    np.testing.assert_array_equal(built.scores([0, 5], rows[::-1]), (ref[0] + ref[5])[::-1])


def test_counts_survive_a_restart_and_the_log(tmp_path: Path) -> None:
    items = [Item(f"it{i}", f"item {i}") for i in range(6)]
    eng = Engine.create(tmp_path / "s", Config(fsync=False), encoder=FakeEncoder(dim=16))
    eng.add_items(items)
    for user, seq in {"a": [0, 1, 2], "b": [1, 2], "c": [2, 3]}.items():
        for i in seq:
            eng.record(user, f"it{i}", "click")
    rows = np.arange(6)
    before = eng._core.state.ranker.coclicks.scores([2], rows)
    np.testing.assert_array_equal(before, [1, 2, 0, 1, 0, 0])
    eng.close(save=False)  # the clicks are only in the event log
    again = Engine.open(tmp_path / "s", encoder=FakeEncoder(dim=16))
    np.testing.assert_array_equal(again._core.state.ranker.coclicks.scores([2], rows), before)
    again.close()  # now they are in the snapshot's click histories
    third = Engine.open(tmp_path / "s", encoder=FakeEncoder(dim=16))
    np.testing.assert_array_equal(third._core.state.ranker.coclicks.scores([2], rows), before)
    third.close()


def test_folding_the_overlay_keeps_every_count(monkeypatch) -> None:
    import engine.state.coclick as cc

    rng = np.random.default_rng(2)
    histories = [list(rng.integers(0, 15, size=int(rng.integers(2, 12)))) for _ in range(25)]
    ref = brute_force(histories, 3, 15)
    monkeypatch.setattr(cc, "FOLD_AT", 7)  # fold many times, also before rows 10-14 exist
    folded = CoClicks(window=3)
    folded.build([], 10)
    for h in histories:
        for t, row in enumerate(h):
            folded.add_click(h[:t], row)
    assert folded._extra_pairs < 7
    rows = np.arange(15)
    for j in range(15):
        np.testing.assert_array_equal(folded.scores([j], rows), ref[j])


def test_several_weightings_in_one_pass_equal_each_alone() -> None:
    """scores(sources, rows, weights of shape (m, len(sources))): row m is, bit for bit, what
    weighting m gives alone (the matrix part and the online overlay both counted)."""
    rng = np.random.default_rng(1)
    histories = [list(rng.integers(0, 40, size=int(rng.integers(2, 20)))) for _ in range(30)]
    cc = CoClicks(window=4)
    cc.build(histories[:20], 40)
    for h in histories[20:]:  # the overlay
        for t, row in enumerate(h):
            cc.add_click(h[:t], row)
    sources, rows = [3, 17, 17, 25], rng.permutation(40)[:31]
    weights = rng.uniform(0.1, 2.0, (3, len(sources)))
    both = cc.scores(sources, rows, weights)
    assert both.shape == (3, len(rows))
    for m in range(3):
        np.testing.assert_array_equal(both[m], cc.scores(sources, rows, weights[m]))
    assert both.any()


def test_neighbours_rank_summed_counts_over_matrix_and_overlay_like_brute_force() -> None:
    """Sources read in one gather (matrix rows and the overlay of clicks since): the n rows with
    the largest summed counts, best first, only `among` when given."""
    rng = np.random.default_rng(3)
    histories = [list(rng.integers(0, 30, size=int(rng.integers(2, 12)))) for _ in range(40)]
    cc = CoClicks(window=4)
    cc.build(histories[:25], 30)
    for h in histories[25:]:  # counted in the overlay
        for t, row in enumerate(h):
            cc.add_click(h[:t], row)
    ref = brute_force(histories, 4, 30)
    among = rng.random(30) < 0.6
    for _ in range(30):
        sources = list(rng.choice(30, int(rng.integers(1, 6)), replace=False))
        total = ref[sources].sum(axis=0)
        for mask in (None, among):
            ok = (total > 0) & (True if mask is None else mask)
            want = sorted(np.flatnonzero(ok), key=lambda r: (-total[r], r))[:7]
            got = cc.neighbours(sources, 7, among=mask)
            # the same counts, best first (ties to the lower row); which of the rows tied at the
            # boundary fill the last places is argpartition's pick
            assert total[got].tolist() == total[want].tolist(), (sources, got, want)
            assert got.tolist() == sorted(got.tolist(), key=lambda r: (-total[r], r))
            assert set(want) - set(got) <= set(np.flatnonzero(total == total[want[-1]])) if want else True
            assert all(ok[got])
    assert cc.neighbours([], 5).tolist() == [] and cc.neighbours([1], 0).tolist() == []


def test_neighbours_less_a_clicks_own_pairs_are_the_neighbours_before_it() -> None:
    rng = np.random.default_rng(4)
    histories = [list(rng.integers(0, 30, size=8)) for _ in range(12)]
    previous = [1, 2, 3]
    for row in range(30, 40):  # rows nobody clicked: their own click is all that could bring them in
        cc = CoClicks(window=3)
        cc.build(histories, 40)
        before = cc.neighbours(previous, 5)
        cc.add_click(previous, row)
        assert row in cc.neighbours(previous, 5)  # three pairs: the click alone puts it first
        np.testing.assert_array_equal(cc.neighbours(previous, 5, less=(row, 3.0)), before)

"""Readers only read: a request changes no shared state, and concurrent requests never see each
other's. Every public reading call is checked from many threads at once against its answer alone."""

from __future__ import annotations

import threading
from collections import deque
from pathlib import Path

import numpy as np

from engine import Config, Engine, Item
from engine.state.columns import StringColumn
from engine.state.vocab import Vocabulary

from conftest import FakeEncoder

WORDS = ["rocket", "orbit", "pasta", "oven", "goal", "league", "guitar", "drum", "river", "forest"]


def fingerprint(obj: object, memo: set[int] | None = None) -> object:
    """A comparable picture of everything reachable from `obj`: arrays by content, containers by
    their elements, objects by their attributes (not FAISS's own objects or locks). Id and string
    columns by their rows, as a dict is by its items: how they are laid out (snapshot bytes or
    tail, hash slots) depends on the history, not on the state."""
    memo = set() if memo is None else memo
    if isinstance(obj, (str, int, float, bool, type(None), bytes)):
        return obj
    if isinstance(obj, (StringColumn, Vocabulary)):
        return (type(obj).__name__, obj.tolist() if isinstance(obj, StringColumn) else obj.ids())
    if id(obj) in memo:
        return "<seen>"
    memo.add(id(obj))
    if isinstance(obj, np.ndarray):
        return (obj.dtype.str, obj.shape, obj.tobytes())
    if isinstance(obj, (list, tuple, deque)):
        return [fingerprint(v, memo) for v in obj]
    if isinstance(obj, (set, frozenset)):
        return sorted(map(repr, obj))
    if isinstance(obj, dict):
        return sorted((repr(k), fingerprint(v, memo)) for k, v in obj.items())
    if type(obj).__module__.startswith("engine") and hasattr(obj, "__dict__"):
        return (type(obj).__name__, fingerprint(vars(obj), memo))
    return type(obj).__name__


def store(tmp_path: Path) -> Engine:
    """300 items, users with clicks, skips, profiles; small candidate pools so that the popular
    list is a cache of part of the catalog."""
    rng = np.random.default_rng(5)
    items = [Item(f"i{n}", f"item {n}", " ".join(rng.choice(WORDS, 3))) for n in range(300)]
    cfg = Config(retrieve=40, popular_candidates=20, coclick_candidates=20, fsync=False)
    eng = Engine.create(tmp_path / "s", cfg, encoder=FakeEncoder(dim=32))
    eng.add_items(items)
    for u in range(8):
        for n in rng.choice(300, size=4 + 6 * u, replace=False):
            eng.record(f"u{u}", f"i{n}", "skip" if n % 5 == 0 else "click")
    eng.set_profile("u2", "rocket orbit forest")
    return eng


def requests() -> list[tuple]:
    """(method name, args, kwargs): every reading call, with different users and options."""
    out = [("recommend", (f"u{u}",), {"k": 5 + u}) for u in range(8)]
    out += [("recommend", ("nobody",), {"k": 7}),
            ("recommend", ("u3",), {"k": 6, "exclude_seen": False, "exclude": ["i1", "i2"]}),
            ("recommend", ("u4",), {"k": 5, "candidates": [f"i{n}" for n in range(0, 300, 7)]}),
            ("recommend", ("t1",), {"k": 8, "history": ["i3", "i9", "i27"]}),
            ("recommend", ("t2",), {"k": 400, "history": ["i4"]}),
            ("similar_items", ("i10",), {"k": 6}), ("user_history", ("u5",), {}),
            ("get_item", ("i11",), {}), ("stats", (), {}), ("__contains__", ("i12",), {})]
    return out


def answer(eng: Engine, call: tuple) -> object:
    name, args, kwargs = call
    got = getattr(eng, name)(*args, **kwargs)
    return [(r.item_id, r.score) for r in got] if name in ("recommend", "similar_items") else got


def test_reads_change_no_state(tmp_path: Path) -> None:
    eng = store(tmp_path)
    eng.recommend("u7", k=5)  # the user with the most seen items: the popular list is built for all
    before = fingerprint(eng._core.state)
    for call in requests():
        answer(eng, call)
    assert fingerprint(eng._core.state) == before
    eng.close(save=False)


def test_concurrent_readers_each_get_their_own_answer(tmp_path: Path) -> None:
    eng = store(tmp_path)
    calls = requests()
    alone = [answer(eng, c) for c in calls]
    errors: list[str] = []

    def reader(t: int) -> None:
        order = np.random.default_rng(t).permutation(len(calls))
        try:
            for _ in range(6):
                for j in order:
                    got = answer(eng, calls[j])
                    if got != alone[j]:
                        errors.append(f"thread {t}: {calls[j][0]}{calls[j][1]} gave another answer")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"thread {t}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=reader, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    eng.close(save=False)


def test_readers_beside_a_writer_see_whole_events(tmp_path: Path) -> None:
    """While a user's clicks are recorded, what the clicks cannot change stays the same for every
    reader, and the user's history is always a whole prefix of the clicks, never half an event."""
    eng = store(tmp_path)
    calls = [c for c in requests() if c[0] in ("similar_items", "get_item", "__contains__")]
    alone = [answer(eng, c) for c in calls]
    clicks = [f"i{n}" for n in range(40)]
    errors: list[str] = []
    done = threading.Event()

    def writer() -> None:
        for item in clicks:
            eng.record("w", item, "click")
        done.set()

    def reader() -> None:
        while not done.is_set():
            for c, want in zip(calls, alone):
                if answer(eng, c) != want:
                    errors.append(f"{c[0]}{c[1]} changed while another user clicked")
            try:
                h = eng.user_history("w")
            except KeyError:
                h = []
            if h != clicks[:len(h)]:
                errors.append(f"a half-applied history: {h}")
            if len(eng.recommend("w", k=5)) != 5:
                errors.append("a short list while the user clicked")

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert eng.user_history("w") == clicks
    eng.close(save=False)

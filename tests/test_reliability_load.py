"""Reliability, load: readers against a writer (L1), removal is final (L2), the single-writer lock
across processes (L3), and a Hypothesis state machine against an in-memory model of the store (L4).

Real FAISS, real files, real processes (forked from a pre-imported fork server and SIGKILLed).
"""

from __future__ import annotations

import random
import shutil
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from rel_fakes import FakeEncoder, env_long, items, kill9, make_store, shared_zygote, wait_for_line  # noqa: E402

from engine import Config, Engine, InvalidInputError, Item, StoreLockedError, UnknownItemError  # noqa: E402
from engine.storage.eventlog import TornTailWarning  # noqa: E402

LONG = env_long()


def sized(short, long):
    """Parametrise a size: the short case always runs; the long one is `slow` and needs KINDLING_LONG=1."""
    return pytest.mark.parametrize("size", [
        pytest.param(short, id="short"),
        pytest.param(long, id="long", marks=[pytest.mark.slow, pytest.mark.skipif(
            not LONG, reason="long version; run with KINDLING_LONG=1 (make test-long)")]),
    ])


# ---- L1: readers and a writer ------------------------------------------------------------------

BATCH = 5
BASE = 300


class Shared:
    """What the writer has done, as the readers may rely on it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.known = {f"base{i}" for i in range(BASE)}  # every id added or being added
        self.removed: set[str] = set()  # ids whose remove_items has returned
        self.batches: list[str] = []  # batches whose add has started
        self.errors: list[str] = []
        self.ops = {"writer": 0, "reader": 0}


def writer(eng: Engine, sh: Shared, stop: float, hist: dict[str, list[str]]) -> None:
    rng, n, live = random.Random(7), 0, []
    try:
        while time.monotonic() < stop:
            r = rng.random()
            if r < 0.35 or not live:
                name = f"b{n}-"
                n += 1
                with sh.lock:
                    sh.known |= {f"{name}{i}" for i in range(BATCH)}
                    sh.batches.append(name)
                eng.add_items(items(name, BATCH))
                live.append(name)
            elif r < 0.55:
                name = live.pop(rng.randrange(len(live)))
                ids = [f"{name}{i}" for i in range(BATCH)]
                eng.remove_items(ids)
                with sh.lock:
                    sh.removed |= set(ids)
            elif r < 0.97:
                user = f"w{rng.randrange(12)}"
                item = (f"base{rng.randrange(BASE)}" if rng.random() < 0.5
                        else f"{rng.choice(live)}{rng.randrange(BATCH)}")
                eng.record(user, item)
                hist.setdefault(user, []).append(item)
            else:
                eng.save()
            sh.ops["writer"] += 1
    except Exception as exc:  # noqa: BLE001
        sh.errors.append(f"writer: {type(exc).__name__}: {exc}")


def reader(eng: Engine, sh: Shared, stop: float, tid: int) -> None:
    rng, n = random.Random(tid), 0
    while time.monotonic() < stop and not sh.errors:
        with sh.lock:
            gone, batches = frozenset(sh.removed), list(sh.batches)
        try:
            r = rng.random()
            if r < 0.45:
                recs = [x.item_id for x in eng.recommend(f"w{rng.randrange(12)}" if rng.random() < 0.7
                                                         else f"cold{tid}", k=20)]
            elif r < 0.7 and batches:
                name = rng.choice(batches)
                recs = [x.item_id for x in eng.recommend(f"cold{tid}", k=10, exclude_seen=False,
                                                         candidates=[f"{name}{i}" for i in range(BATCH)])]
                if len(recs) not in (0, BATCH):
                    sh.errors.append(f"reader {tid} saw {len(recs)} of the {BATCH} items of batch {name}")
            elif r < 0.92:
                recs = [x.item_id for x in eng.similar_items(f"base{rng.randrange(BASE)}", k=10)]
            else:
                st_ = eng.stats()
                recs = []
                idx = st_["index"]
                if (st_["live_items"] - BASE) % BATCH or idx["vectors"] - idx["tombstones"] != st_["live_items"]:
                    sh.errors.append(f"reader {tid} saw a half-applied change: {st_}")
            with sh.lock:
                unknown = [i for i in recs if i not in sh.known]
            bad = [i for i in recs if i in gone]
            if unknown or bad or len(recs) != len(set(recs)):
                sh.errors.append(f"reader {tid}: unknown {unknown}, removed {bad}, or duplicates in {recs}")
        except Exception as exc:  # noqa: BLE001
            sh.errors.append(f"reader {tid}: {type(exc).__name__}: {exc}")
        n += 1
    with sh.lock:
        sh.ops["reader"] += n


@sized(1.5, 8.0)
def test_l1_four_readers_and_a_writer(tmp_path, size):
    eng = make_store(tmp_path / "s", BASE, prefix="base")
    sh, hist = Shared(), {}
    stop = time.monotonic() + size
    threads = [threading.Thread(target=writer, args=(eng, sh, stop, hist))]
    threads += [threading.Thread(target=reader, args=(eng, sh, stop, t)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=size + 120)
    assert not any(t.is_alive() for t in threads), "a thread hung (deadlock?)"
    assert not sh.errors, "\n".join(sh.errors[:10])
    assert sh.ops["writer"] > 20 and sh.ops["reader"] > 40, sh.ops
    for user, h in hist.items():
        assert eng.user_history(user) == h
    assert eng.stats()["events"] == sum(map(len, hist.values()))
    live = {i for i in sh.known if i not in sh.removed}
    eng.close(save=False)
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=True)
    assert all(i in eng for i in live) and not any(i in eng for i in sh.removed)
    assert all(eng.user_history(u) == h for u, h in hist.items())
    eng.close()


# ---- L2: removed means gone --------------------------------------------------------------------

def assert_gone(eng: Engine, gone: set[str], all_ids: list[str], users: list[str]) -> None:
    live = [i for i in all_ids if i not in gone]
    for user in users:
        for kw in ({}, {"exclude_seen": False}, {"candidates": all_ids}):
            got = {r.item_id for r in eng.recommend(user, k=len(all_ids), **kw)}
            assert not got & gone, f"recommend({user!r}, {kw and list(kw)}) returned removed {sorted(got & gone)[:5]}"
    for item in live:
        got = {r.item_id for r in eng.similar_items(item, k=20)}
        assert not got & gone, f"similar_items({item!r}) returned removed {sorted(got & gone)[:5]}"
    for item in gone:
        assert item not in eng
        with pytest.raises(UnknownItemError):
            eng.similar_items(item)
        with pytest.raises(UnknownItemError):
            eng.get_item(item)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_l2_removed_items_never_come_back(tmp_path, kind):
    eng = make_store(tmp_path / "s", 200, index=kind)
    all_ids = [f"m{i}" for i in range(200)]
    for j in range(8):  # make m1..m3 popular and give "warm" a taste
        for item in ("m1", "m2", "m3"):
            eng.record(f"fan{j}", item)
    for i in range(0, 50, 5):
        eng.record("warm", f"m{i}")
    eng.set_profile("prof", "space robots episode")
    users = ["warm", "cold", "prof", "fan0"]
    gone = {"m1", "m2", "m3"} | {r.item_id for u in users for r in eng.recommend(u, k=8)}
    gone |= {r.item_id for r in eng.similar_items("m0", k=5)}
    eng.remove_items(sorted(gone))
    assert_gone(eng, gone, all_ids, users)
    more = {f"m{i}" for i in range(100, 160)} - gone  # past the compaction ratio: the index is rebuilt
    eng.remove_items(sorted(more))
    gone |= more
    assert_gone(eng, gone, all_ids, users)
    eng.close(save=False)  # replayed from the log
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder())
    assert_gone(eng, gone, all_ids, users)
    eng.save()
    eng.close()
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=True)  # from the snapshot
    assert_gone(eng, gone, all_ids, users)
    eng.close()


def test_l2_removal_is_immediate_under_concurrent_readers(tmp_path):
    """Readers running while remove_items returns never see those ids in a later call."""
    eng = make_store(tmp_path / "s", 150)
    stop, errors, removed = threading.Event(), [], set()
    lock = threading.Lock()

    def read(tid):
        while not stop.is_set():
            with lock:
                gone = frozenset(removed)
            got = {r.item_id for r in eng.recommend(f"c{tid}", k=150)}
            got |= {r.item_id for r in eng.similar_items("m0", k=30)}
            if got & gone:
                errors.append(sorted(got & gone))

    threads = [threading.Thread(target=read, args=(t,)) for t in range(3)]
    for t in threads:
        t.start()
    for i in range(1, 60, 2):
        eng.remove_items([f"m{i}"])
        with lock:
            removed.add(f"m{i}")
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    eng.close()


# ---- L3: one writer across processes -----------------------------------------------------------

def test_l3_second_writer_gets_locked_error_then_takes_over_a_killed_lock(tmp_path):
    from click.testing import CliRunner

    from engine.cli import main

    make_store(tmp_path / "s", 20).close()
    zygote = shared_zygote()
    out = tmp_path / "hold.txt"
    pid = zygote.spawn(out, "hold", tmp_path / "s")
    wait_for_line(out, "ready\n", pid)
    try:
        with pytest.raises(StoreLockedError, match=rf"locked for writing by pid {pid}"):
            Engine.open(tmp_path / "s", encoder=FakeEncoder())
        res = CliRunner().invoke(main, ["feedback", str(tmp_path / "s"), "--user", "u", "--item", "m1"])
        assert res.exit_code == 1 and "locked" in res.output and isinstance(res.exception, SystemExit), res.output
        ro = Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=True)  # readers still may
        assert "m1" in ro
        ro.close()
    finally:
        kill9(pid)
    eng = Engine.open(tmp_path / "s", encoder=FakeEncoder())  # the dead writer's lock is taken over
    assert f"pid {__import__('os').getpid()}" in (tmp_path / "s" / "LOCK").read_text()
    eng.record("u", "m1")
    eng.close()


def test_l3_same_process_second_writer_is_locked_out(tmp_path):
    eng = make_store(tmp_path / "s", 5)
    with pytest.raises(StoreLockedError, match="locked"):
        Engine.open(tmp_path / "s", encoder=FakeEncoder())
    eng.close()
    Engine.open(tmp_path / "s", encoder=FakeEncoder()).close()


@sized(2.0, 10.0)
def test_l3_readers_open_while_another_process_saves(tmp_path, size):
    """A read-only open racing the writer's saves (which delete the old generation) still succeeds."""
    eng = Engine.create(tmp_path / "s", encoder=FakeEncoder())
    eng.add_items(items("base", 200))
    eng.close()
    out = tmp_path / "saver.txt"
    pid = shared_zygote().spawn(out, "saver", tmp_path / "s", size)
    wait_for_line(out, "ready\n", pid)
    opens, failures = 0, []
    stop = time.monotonic() + size
    while time.monotonic() < stop:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TornTailWarning)  # the writer may be mid-append
                ro = Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=True)
            if ro.stats()["live_items"] != 200:
                failures.append(f"saw {ro.stats()['live_items']} items")
            ro.close()
        except Exception as exc:  # noqa: BLE001
            failures.append(f"{type(exc).__name__}: {exc}")
        opens += 1
    deadline = time.monotonic() + 30
    while "saves" not in out.read_text() and time.monotonic() < deadline:
        time.sleep(0.01)
    saves = int(out.read_text().split("saves ")[1])
    assert not failures, f"{len(failures)} of {opens} opens failed, e.g. {failures[:3]}"
    assert opens > 10 and saves > 10, (opens, saves)


# ---- L4: a state machine against a model ---------------------------------------------------------

IDS = ["a", "b", "c", "é", "e\u0301", "🎬", "שלום", "x y", "m\u200f"]  # NFC/NFD, emoji, RTL, marks
USERS = ["u1", "u2", "ü", "👤"]
_chars = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
TEXT = st.text(_chars, max_size=20)
TITLE = st.text(_chars, min_size=1, max_size=20).filter(lambda t: t.strip())
CATS = st.lists(st.text(_chars, min_size=1, max_size=8).filter(lambda t: t.strip()), max_size=3)
ITEM = st.builds(lambda i, t, x, c: Item(i, t, x, tuple(c)), st.sampled_from(IDS), TITLE, TEXT, CATS)


class StoreMachine(RuleBasedStateMachine):
    """Random add/upsert/ingest/remove/record/profile/save/reopen against a dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="kindling-l4-"))
        self.eng = Engine.create(self.dir / "s", Config(compact_ratio=0.3), encoder=FakeEncoder())
        self.live: dict[str, Item] = {}
        self.ever: set[str] = set()
        self.hist: dict[str, list[str]] = {}
        self.seen: dict[str, set[str]] = {}
        self.users: set[str] = set()
        self.events = 0

    @rule(batch=st.lists(ITEM, min_size=1, max_size=4), upsert=st.booleans(), bulk=st.booleans())
    def add(self, batch, upsert, bulk):
        ids = [i.item_id for i in batch]
        call = self.eng.ingest if bulk else self.eng.add_items
        kw = {"progress": False} if bulk else {}
        if len(set(ids)) != len(ids) or (not upsert and any(i in self.live for i in ids)):
            with pytest.raises(InvalidInputError):
                call(batch, upsert=upsert, **kw)
            return
        assert call(batch, upsert=upsert, **kw) == len(batch)
        for it in batch:
            self.live[it.item_id] = it
            self.ever.add(it.item_id)

    @rule(ids=st.lists(st.sampled_from(IDS), min_size=1, max_size=3))
    def remove(self, ids):
        if any(i not in self.live for i in ids):
            with pytest.raises(UnknownItemError):
                self.eng.remove_items(ids)
            return
        assert self.eng.remove_items(ids) == len(set(ids))
        for i in ids:
            self.live.pop(i, None)

    @rule(user=st.sampled_from(USERS), item=st.sampled_from(IDS),
          kind=st.sampled_from(["click", "click", "skip", "impression"]))
    def record(self, user, item, kind):
        if item not in self.live:
            with pytest.raises(UnknownItemError):
                self.eng.record(user, item, kind)
            return
        self.eng.record(user, item, kind)
        self.users.add(user)
        self.events += 1
        if kind == "click":
            self.hist.setdefault(user, []).append(item)
        if kind != "impression":
            self.seen.setdefault(user, set()).add(item)

    @rule(user=st.sampled_from(USERS), text=TITLE)
    def profile(self, user, text):
        if not self.ever:
            with pytest.raises(InvalidInputError):
                self.eng.set_profile(user, text)
            return
        self.eng.set_profile(user, text)
        self.users.add(user)

    @rule()
    def save(self):
        self.eng.save()

    @rule(save=st.booleans(), read_only=st.booleans())
    def reopen(self, save, read_only):
        self.eng.close(save=save)
        if read_only:  # a reader sees the same thing; then the writer comes back
            ro = Engine.open(self.dir / "s", encoder=FakeEncoder(), read_only=True)
            self.check(ro)
            ro.close()
        self.eng = Engine.open(self.dir / "s", encoder=FakeEncoder())

    def check(self, eng: Engine) -> None:
        for i in IDS:
            assert (i in eng) == (i in self.live), i
            if i in self.live:
                assert eng.get_item(i) == self.live[i]
        st_ = eng.stats()
        assert (st_["live_items"], st_["items"], st_["users"], st_["events"]) == (
            len(self.live), len(self.ever), len(self.users), self.events)
        for user in self.users:
            assert eng.user_history(user) == self.hist.get(user, [])
        for user in USERS[:2] + ["nobody"]:
            got = [r.item_id for r in eng.recommend(user, k=20)]
            assert len(got) == len(set(got)) and set(got) <= set(self.live), got
            assert not set(got) & self.seen.get(user, set()), "a seen item was recommended"
        for item in list(self.live)[:2]:
            got = [r.item_id for r in eng.similar_items(item, k=20)]
            assert len(got) == len(set(got)) and set(got) <= set(self.live) - {item}, got

    @invariant()
    def matches_model(self):
        self.check(self.eng)

    def teardown(self):
        self.eng.close(save=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def _run_machine(examples: int, steps: int) -> None:
    run_state_machine_as_test(StoreMachine, settings=settings(
        max_examples=examples, stateful_step_count=steps, deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much]))


def test_l4_state_machine_short():
    _run_machine(12, 20)


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long version; run with KINDLING_LONG=1 (make test-long)")
def test_l4_state_machine_long():
    _run_machine(120, 50)

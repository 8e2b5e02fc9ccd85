"""Read replicas: a read-only engine that follows the writer's log (Engine.open(follow=True)).

Every wait polls with a deadline for what must become true; the checks that something did NOT
happen wait for two polls of the follower that started after the thing was done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from engine import Config, Engine, InvalidInputError, Item, ReadOnlyStoreError, StoreLockedError
from engine.storage.eventlog import EventLog
from engine.storage.records import EventRecord, to_payload

from conftest import FakeEncoder, small_catalog
from test_readers import fingerprint

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = 0.005


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        time.sleep(0.002)


def two_polls_after(replica: Engine, t: float) -> None:
    """Return once the follower has begun two polls after time `t`."""
    wait_until(lambda: replica.replica_lag()["last_poll_at"] > t, "a poll after t")
    first = replica.replica_lag()["last_poll_at"]
    wait_until(lambda: replica.replica_lag()["last_poll_at"] > first, "a second poll after t")


def comparable(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if k not in ("path", "replica")}


def caught_up(writer: Engine, replica: Engine) -> bool:
    return comparable(replica.stats()) == comparable(writer.stats())


def follow(path: Path, **kw) -> Engine:
    return Engine.open(path, encoder=FakeEncoder(), read_only=True, follow=True, follow_interval_s=INTERVAL, **kw)


@pytest.fixture
def writer(tmp_path: Path):
    eng = Engine.create(tmp_path / "store", Config(fsync=False), encoder=FakeEncoder())
    eng.add_items(small_catalog())
    yield eng
    eng.close(save=False)


def mutate(writer: Engine, tag: str) -> None:
    """Clicks, skips, a new item, a removal and a profile: one record of every kind but import."""
    for n, item in enumerate(["space-0", "space-1", "food-2", "ball-3", "space-2"]):
        writer.record(f"{tag}-u1", item, "skip" if n == 3 else "click")
    writer.record(f"{tag}-u2", "food-1")
    writer.add_items([Item(f"{tag}-new", "New rocket", "rocket orbit moon launch", ("space",))])
    writer.record(f"{tag}-u2", f"{tag}-new")
    writer.remove_items(["ball-0"] if tag == "a" else ["ball-1"])
    writer.set_profile(f"{tag}-u3", "pasta recipe oven")


def same_answers(a: Engine, b: Engine, users: list[str]) -> None:
    for u in users:
        assert [(r.item_id, r.score) for r in a.recommend(u, k=5)] == \
               [(r.item_id, r.score) for r in b.recommend(u, k=5)], u


def test_replica_applies_every_kind_of_record(writer: Engine) -> None:
    replica = follow(writer.path)
    try:
        mutate(writer, "a")
        wait_until(lambda: caught_up(writer, replica), "the replica's stats match the writer's")
        assert replica.user_history("a-u1") == writer.user_history("a-u1") == ["space-0", "space-1", "food-2",
                                                                                 "space-2"]
        assert "a-new" in replica and "ball-0" not in replica
        with Engine.open(writer.path, encoder=FakeEncoder(), read_only=True) as fresh:  # what recovery gives
            assert fingerprint(replica._core.state) == fingerprint(fresh._core.state)
            same_answers(replica, fresh, ["a-u1", "a-u2", "a-u3", "nobody"])
        same_answers(replica, writer, ["a-u1", "a-u2", "a-u3", "nobody"])
        lag = replica.replica_lag()
        assert lag["following"] and lag["error"] is None and lag["applied_records"] >= 10
        assert lag["behind_s"] < 5 and replica.stats()["replica"]["generation"] == writer.stats()["generation"]
    finally:
        replica.close()
    assert writer.replica_lag() is None


def test_a_plain_save_is_followed_without_a_reload(writer: Engine) -> None:
    replica = follow(writer.path)
    try:
        mutate(writer, "a")
        writer.save()
        writer.record("a-u1", "food-3")
        writer.save()
        mutate(writer, "b")
        wait_until(lambda: caught_up(writer, replica), "the replica reached the writer's generation 2")
        lag = replica.replica_lag()
        assert (lag["generation"], lag["reloads"], lag["saves_continued"]) == (2, 0, 2)
        # The replica went on as the writer did (a fresh open differs in its unsaved random state).
        for part in ("users", "index", "event_keys"):
            assert fingerprint(getattr(replica._core.state, part)) == fingerprint(getattr(writer._core.state, part)), part
        assert fingerprint(replica._core.state.ranker.reranker) == fingerprint(writer._core.state.ranker.reranker)
        same_answers(replica, writer, ["a-u1", "b-u1", "b-u2", "b-u3"])
    finally:
        replica.close()


def test_replica_crosses_saves_and_ingests(writer: Engine) -> None:
    replica = follow(writer.path)
    try:
        mutate(writer, "a")
        writer.save()  # the old generation's files are deleted while the replica holds its log
        mutate(writer, "b")
        writer.ingest([Item(f"bulk-{n}", f"Bulk {n}", "guitar drum music song") for n in range(5)])  # no log record
        writer.record("b-u1", "bulk-3")
        wait_until(lambda: caught_up(writer, replica), "the replica reached the writer's third generation")
        assert replica.stats()["generation"] == writer.stats()["generation"] == 2
        assert replica.replica_lag()["reloads"] >= 1
        assert replica.user_history("b-u1")[-1] == "bulk-3" and "bulk-0" in replica
        with Engine.open(writer.path, encoder=FakeEncoder(), read_only=True) as fresh:
            assert fingerprint(replica._core.state) == fingerprint(fresh._core.state)
            same_answers(replica, fresh, ["a-u1", "b-u1", "b-u2", "b-u3"])
    finally:
        replica.close()


def append_by_hand(log: Path, seq: int, user: str, item: str) -> bytes:
    """The bytes EventLog writes for one click with sequence number `seq` (made in a scratch file)."""
    scratch = log.with_name("scratch.bin")
    el = EventLog(scratch, seq, fsync=False)
    el.append(to_payload(EventRecord(user, item, "click", 1.0, 1_700_000_000)))
    el.close()
    blob = scratch.read_bytes()
    scratch.unlink()
    return blob


def test_an_incomplete_tail_waits_and_is_never_cut(writer: Engine) -> None:
    writer.record("u1", "space-0")
    writer.close(save=False)  # no writer from here: the test appends to the log by hand
    path = writer.path
    log = next(path.glob("events-*.log"))
    replica = follow(path)
    try:
        seq = replica.replica_lag()["applied_seq"] + 1
        blob = append_by_hand(log, seq, "u1", "food-1")
        size = log.stat().st_size
        with open(log, "ab") as fh:  # a writer mid-append: the header and part of the payload
            fh.write(blob[:20])
        t = time.time()
        two_polls_after(replica, t)
        assert replica.user_history("u1") == ["space-0"]
        assert log.stat().st_size == size + 20  # not truncated
        assert replica.replica_lag()["error"] is None
        with open(log, "ab") as fh:
            fh.write(blob[20:])
        wait_until(lambda: replica.user_history("u1") == ["space-0", "food-1"], "the completed record applied")
        assert replica.replica_lag()["applied_seq"] == seq
    finally:
        replica.close()


def test_damage_is_reported_not_skipped_and_a_rewritten_record_resyncs(writer: Engine) -> None:
    for item in ["space-0", "space-1", "space-2"]:
        writer.record("u1", item)
    writer.close(save=False)
    path = writer.path
    log = next(path.glob("events-*.log"))
    replica = follow(path)
    try:
        seq = replica.replica_lag()["applied_seq"] + 1
        size = log.stat().st_size
        with open(log, "ab") as fh:  # an intact record with a sequence number from nowhere, then a good one
            fh.write(append_by_hand(log, seq + 5, "u1", "food-0") + append_by_hand(log, seq + 6, "u1", "food-1"))
        wait_until(lambda: replica.replica_lag()["error"] is not None, "the damage reported")
        assert "sequence number" in replica.replica_lag()["error"]
        assert replica.user_history("u1") == ["space-0", "space-1", "space-2"]  # still served, as it was
        with open(log, "r+b") as fh:  # the damage goes: the replica's retry loads the log again
            fh.truncate(size)
        wait_until(lambda: replica.replica_lag()["error"] is None, "the replica recovered")
        reloads = replica.replica_lag()["reloads"]
        assert replica.user_history("u1") == ["space-0", "space-1", "space-2"]
        last = append_by_hand(log, seq - 1, "u1", "space-2")
        other = append_by_hand(log, seq - 1, "u1", "space-3")
        assert len(other) == len(last)
        with open(log, "r+b") as fh:  # the last applied record replaced (a writer rolled it back, then
            fh.truncate(size - len(last))  # appended another with its number): same size, new bytes
            fh.seek(0, os.SEEK_END)
            fh.write(other)
        wait_until(lambda: replica.user_history("u1") == ["space-0", "space-1", "space-3"],
                   "the replica resynchronised")
        assert replica.replica_lag()["reloads"] == reloads + 1 and replica.replica_lag()["error"] is None
    finally:
        replica.close()


WRITER = textwrap.dedent("""
    import sys
    from engine import Config, Engine
    eng = Engine.open(sys.argv[1])
    print("ready", flush=True)
    for n in range(int(sys.argv[2])):
        eng.record("sub", ["food-0", "food-1", "food-2", "ball-0"][n % 4], "click")
        if n == 40:
            eng.save()
    eng.close(save=False)
    print("done", flush=True)
""")


def test_a_writer_process_and_a_following_reader(writer: Engine) -> None:
    path = writer.path
    writer.close()
    replica = follow(path)
    try:
        with pytest.raises(InvalidInputError, match="read_only"):
            Engine.open(path, follow=True)
        proc = subprocess.run([sys.executable, "-c", WRITER, str(path), "120"], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.stdout.split() == ["ready", "done"], proc.stderr  # it got the lock: the replica holds none
        want = [["food-0", "food-1", "food-2", "ball-0"][n % 4] for n in range(120)]
        wait_until(lambda: _history(replica, "sub") == want,
                   "all 120 clicks of the writer process")
        assert replica.stats()["generation"] == 2
    finally:
        replica.close()


def _history(eng: Engine, user: str) -> list[str]:
    try:
        return eng.user_history(user)
    except KeyError:
        return []


def test_replica_refuses_writes_takes_no_lock_and_stops_on_close(writer: Engine) -> None:
    replica = follow(writer.path)  # the writer holds the lock; a replica opens beside it
    with pytest.raises(ReadOnlyStoreError, match="writes go to"):
        replica.record("u1", "space-0")
    with pytest.raises(InvalidInputError, match="follow_interval_s"):
        Engine.open(writer.path, read_only=True, follow=True, follow_interval_s=0)
    threads = [t for t in threading.enumerate() if t.name.startswith("kindling-follow")]
    assert threads
    writer.close(save=False)
    again = Engine.open(writer.path, encoder=FakeEncoder())  # the lock is free although the replica is open
    try:
        with pytest.raises(StoreLockedError):
            Engine.open(writer.path)
    finally:
        again.close(save=False)
    replica.close()
    assert not any(t.is_alive() for t in threads)


def test_readers_see_whole_records_while_the_replica_applies(writer: Engine) -> None:
    """Requests on the replica, from several threads, while it applies adds, removals and clicks."""
    replica = follow(writer.path)
    errors: list[BaseException] = []
    done = threading.Event()
    states = [frozen(writer.stats())]  # every state the writer passed through, one per record
    observed: list[tuple] = []

    def reader(n: int) -> None:
        while not done.is_set():
            try:
                observed.append(frozen(replica.stats()))
                recs = replica.recommend(f"r{n % 3}", k=6)
                assert len({r.item_id for r in recs}) == len(recs)
                for r in recs[:2]:
                    replica.similar_items(r.item_id, k=3) if r.item_id in replica else None
            except KeyError:  # an item removed between the two calls
                pass
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=reader, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    def let_readers_look() -> None:  # a fast writer could finish before the readers ran
        seen, deadline = len(observed), time.monotonic() + 0.5
        while len(observed) == seen and time.monotonic() < deadline:
            time.sleep(0.0005)

    try:
        for n in range(120):
            writer.record(f"r{n % 3}", small_catalog()[n % 12].item_id, "skip" if n % 7 == 0 else "click")
            states.append(frozen(writer.stats()))
            if n % 4 == 0:
                let_readers_look()
            if n % 15 == 0:
                writer.add_items([Item(f"x{n}", f"Extra {n}", "rocket pasta goal " * (1 + n % 3))])
                states.append(frozen(writer.stats()))
            if n % 15 == 5:
                writer.remove_items([f"x{n - 5}"])
                states.append(frozen(writer.stats()))
        wait_until(lambda: caught_up(writer, replica), "the replica caught up")
    finally:
        done.set()
        for t in threads:
            t.join()
        replica.close()
    assert not errors, errors[0]
    assert len(observed) > 10 and not set(observed) - set(states)  # never a state between two records


def frozen(stats: dict) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in comparable(stats).items()))


def test_kindling_serve_replica_reads_follow_and_writes_get_403(writer: Engine, tmp_path: Path) -> None:
    httpx = pytest.importorskip("httpx")
    pytest.importorskip("uvicorn")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "replica.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", str(writer.path), "--port", str(port),
                             "--replica"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def up() -> bool:
        assert proc.poll() is None, (tmp_path / "replica.log").read_text()
        try:
            return client.get("/healthz").status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(up, "the replica server answers", timeout=120)
        resp = client.post("/events", json={"user_id": "web", "item_id": "space-1"})
        assert resp.status_code == 403 and "writes go to the store's one writer" in resp.json()["detail"]
        writer.record("web", "space-1")
        wait_until(lambda: client.get("/users/web").status_code == 200, "the writer's click on the replica")
        assert client.get("/users/web").json()["history"] == ["space-1"]
        assert [r["item_id"] for r in client.post("/recommend", json={"user_id": "web", "k": 3}).json()["items"]]
        assert client.get("/stats").json()["replica"]["error"] is None
        assert "kindling_replica_behind_seconds" in client.get("/metrics").text
    finally:
        client.close()
        proc.terminate()
        code = proc.wait(60)
        log.close()
    text = (tmp_path / "replica.log").read_text()
    assert code in (0, -signal.SIGTERM) and "Application shutdown complete" in text and "Traceback" not in text, text

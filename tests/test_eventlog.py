"""The write-ahead log: CRC-checked records with sequence numbers; a torn tail is dropped, not fatal."""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine import CorruptStoreError
from engine.storage.eventlog import HEADER, EventLog, TornTailWarning, read_log

json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
records = st.lists(st.dictionaries(st.text(max_size=8), json_value, max_size=5), max_size=15)


@settings(max_examples=60, deadline=None)
@given(records, st.integers(0, 10**6))
def test_round_trip(recs, start):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "events.log"
        log = EventLog(path, start, fsync=False)
        seqs = [log.append(r) for r in recs]
        log.close()
        assert seqs == list(range(start, start + len(recs)))
        assert list(read_log(path)) == list(zip(seqs, recs))


def _write(path: Path, n: int) -> None:
    log = EventLog(path, 0, fsync=False)
    for i in range(n):
        log.append({"op": "event", "n": i})
    log.close()


def test_torn_tail_is_dropped_with_a_warning_and_repaired(tmp_path):
    path = tmp_path / "e.log"
    _write(path, 3)
    whole = path.stat().st_size
    with open(path, "ab") as fh:
        fh.write(HEADER.pack(100, 0, 3) + b'{"op": "ev')  # a crash mid-append
    with pytest.warns(TornTailWarning, match="dropped a partial record"):
        assert [s for s, _ in read_log(path)] == [0, 1, 2]
    assert path.stat().st_size > whole  # not repaired unless asked
    with pytest.warns(TornTailWarning):
        list(read_log(path, repair=True))
    assert path.stat().st_size == whole
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list(read_log(path))) == 3


def test_bad_crc_in_the_last_record_is_a_torn_tail(tmp_path):
    path = tmp_path / "e.log"
    _write(path, 2)
    data = bytearray(path.read_bytes())
    data[-2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.warns(TornTailWarning):
        assert [s for s, _ in read_log(path)] == [0]


def test_bad_crc_before_more_records_is_corruption(tmp_path):
    path = tmp_path / "e.log"
    _write(path, 3)
    data = bytearray(path.read_bytes())
    data[HEADER.size + 2] ^= 0x01  # inside the first payload
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match="byte offset 0"):
        list(read_log(path))


def test_appending_continues_after_reopen(tmp_path):
    path = tmp_path / "e.log"
    _write(path, 2)
    log = EventLog(path, 2, fsync=True)
    assert log.append({"op": "x"}) == 2
    log.close()
    assert [s for s, _ in read_log(path)] == [0, 1, 2]


def test_missing_log_reads_as_empty(tmp_path):
    assert list(read_log(tmp_path / "nope.log")) == []


@pytest.mark.parametrize("payload, rule", [
    ({"op": "merge", "u": "a"}, "unknown record op 'merge'"),
    ({"op": "event", "u": "a"}, "malformed 'event' record"),
    ({"u": "a", "i": "b"}, "unknown record op None"),
])
def test_replay_refuses_a_record_it_does_not_know(tmp_path, payload, rule):
    from engine import Engine, Item

    from conftest import FakeEncoder

    path = tmp_path / "s"
    eng = Engine.create(path, encoder=FakeEncoder())
    eng.add_items([Item("a", "A"), Item("b", "B")])
    eng.record("u", "a")
    log_path, seq = eng._core.log.path, eng._core.log.next_seq
    eng.close(save=False)
    log = EventLog(log_path, seq)
    log.append(payload)  # intact framing and CRC: only its content is unknown
    log.close()
    with pytest.raises(CorruptStoreError, match=rule) as err:
        Engine.open(path, encoder=FakeEncoder())
    assert f"{log_path.name}, record {seq}" in str(err.value)


# ---- group commit ------------------------------------------------------------------------------
def test_group_commit_shares_fsyncs_and_acknowledges_each_record_after_its_own(tmp_path, monkeypatch):
    """Eight threads write while a slow fsync runs: later fsyncs cover several records each, and
    no append returns before an fsync that started after its record was written has finished."""
    import os
    import threading
    import time

    path = tmp_path / "events.log"
    log = EventLog(path, 0, fsync=True)
    real, durable, calls = os.fsync, [0], [0]

    def slow_fsync(fd):
        size = os.fstat(fd).st_size  # what this fsync will cover at least
        time.sleep(0.005)
        real(fd)
        calls[0] += 1
        durable[0] = max(durable[0], size)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    lock, late = threading.Lock(), []

    def writer(t: int) -> None:
        for i in range(20):
            with lock:  # the caller serialises writes (the engine's write lock)
                ticket = log.write([{"op": "event", "t": t, "i": i}])
                end = path.stat().st_size
            log.sync(ticket)
            if durable[0] < end:
                late.append((t, i))

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    log.close()
    assert late == []
    assert calls[0] < 160 / 2, calls  # shared: at least two records per fsync on average
    assert [seq for seq, _ in read_log(path)] == list(range(160))


def test_a_failed_fsync_fails_every_record_it_should_have_covered_until_rewound(tmp_path, monkeypatch):
    import errno
    import os

    from engine.storage.eventlog import LogSyncError

    path = tmp_path / "events.log"
    log = EventLog(path, 0, fsync=True)
    log.append({"n": 0})
    good = path.stat().st_size
    first, second = log.write([{"n": 1}]), log.write([{"n": 2}])

    def broken(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", broken)
    with pytest.raises(LogSyncError, match="fsync failed"):
        log.sync(first)
    with pytest.raises(LogSyncError):
        log.sync(second)  # not covered either
    with pytest.raises(Exception, match="not recorded"):
        log.write([{"n": 3}])  # refused until rewound
    monkeypatch.undo()
    assert log.rewind() and path.stat().st_size == good
    with pytest.raises(LogSyncError, match="cut off"):
        log.sync(second)  # an old ticket never reads as durable
    assert log.append({"n": 4}) == 1
    log.close()
    assert [r for _, r in read_log(path)] == [{"n": 0}, {"n": 4}]

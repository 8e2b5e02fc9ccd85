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
    log_path, seq = eng._log.path, eng._log.next_seq
    eng.close(save=False)
    log = EventLog(log_path, seq)
    log.append(payload)  # intact framing and CRC: only its content is unknown
    log.close()
    with pytest.raises(CorruptStoreError, match=rule) as err:
        Engine.open(path, encoder=FakeEncoder())
    assert f"{log_path.name}, record {seq}" in str(err.value)

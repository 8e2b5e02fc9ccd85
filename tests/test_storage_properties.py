"""Property tests of the event log and the store: any records, any truncation, any byte flip.

Reading back gives a prefix of what was acknowledged, or a StoreError naming the file; never a
wrong record, never an unrelated exception. Example counts are bounded for `make test`;
KINDLING_LONG=1 (make test-long) or KINDLING_PROPERTY_EXAMPLES=N runs more.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import FakeEncoder
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import CorruptStoreError, Engine, Item, StoreError
from engine.storage.eventlog import EventLog, read_log

LONG = bool(os.environ.get("KINDLING_LONG"))


def examples(short: int) -> int:
    return int(os.environ.get("KINDLING_PROPERTY_EXAMPLES", short * 20 if LONG else short))


def bounded(short: int):
    return settings(max_examples=examples(short), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---- the event log alone -------------------------------------------------------------------------

payloads = st.lists(st.dictionaries(st.sampled_from(["op", "user", "item", "v", "text"]),
                                    st.integers(-2**40, 2**40) | st.text(max_size=12) | st.none(),
                                    max_size=4), min_size=1, max_size=10)


def written(folder: Path, recs: list[dict], start: int) -> tuple[Path, list[tuple[int, dict]]]:
    path = folder / "events.log"
    log = EventLog(path, start, fsync=False)
    acked = [(log.append(r), r) for r in recs]
    log.close()
    return path, acked


def read_back(path: Path, start: int, repair: bool = False) -> list[tuple[int, dict]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a TornTailWarning is allowed; what is read is checked
        return list(read_log(path, repair=repair, first_seq=start))


@bounded(150)
@given(payloads, st.integers(0, 2**40), st.floats(0, 1))
def test_log_cut_anywhere_reads_back_every_whole_record_before_the_cut(recs, start, where):
    with tempfile.TemporaryDirectory() as d:
        path, acked = written(Path(d), recs, start)
        data = path.read_bytes()
        cut = int(where * len(data))
        path.write_bytes(data[:cut])
        whole, ends = [], 0
        for seq, rec in acked:
            ends += len(read_log_bytes_of(seq, rec))
            if ends <= cut:
                whole.append((seq, rec))
        assert read_back(path, start) == whole
        assert read_back(path, start, repair=True) == whole  # the torn tail is cut off ...
        log = EventLog(path, start + len(whole), fsync=False)  # ... and the log takes appends after it
        log.append({"op": "after"})
        log.close()
        assert read_back(path, start) == [*whole, (start + len(whole), {"op": "after"})]


def read_log_bytes_of(seq: int, rec: dict) -> bytes:
    """The bytes EventLog writes for one record (to know where each record ends)."""
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "one.log"
        log = EventLog(p, seq, fsync=False)
        log.append(rec)
        log.close()
        return p.read_bytes()


@bounded(200)
@given(payloads, st.integers(0, 2**40), st.floats(0, 1, exclude_max=True), st.integers(1, 255), st.booleans())
def test_log_byte_flip_reads_a_prefix_or_names_the_offset(recs, start, where, xor, repair):
    with tempfile.TemporaryDirectory() as d:
        path, acked = written(Path(d), recs, start)
        data = bytearray(path.read_bytes())
        pos = int(where * len(data))
        data[pos] ^= xor
        path.write_bytes(bytes(data))
        try:
            got = read_back(path, start, repair=repair)
        except CorruptStoreError as exc:
            assert str(path) in str(exc) and "byte offset" in str(exc)
            assert path.read_bytes() == bytes(data), "a refused log must be left as it was"
        else:
            assert got == acked[:len(got)], "a record read back that was never acknowledged"
            assert len(got) < len(acked), "a damaged record was read as intact"


# ---- the store: snapshot and log ------------------------------------------------------------------

TOPICS = ["space rocket orbit", "pasta recipe oven", "football goal league", "jazz music night"]


def item(i: int) -> Item:
    return Item(f"i{i}", f"Title {i}", f"{TOPICS[i % 4]} number {i}", (TOPICS[i % 4].split()[0],))


op = st.one_of(st.tuples(st.just("add"), st.integers(1, 4)),
               st.tuples(st.just("click"), st.integers(0, 2), st.integers(0, 40)),
               st.tuples(st.just("remove"), st.integers(0, 40)),
               st.just(("save",)))


class Model:
    """What the store must show after each acknowledged operation: live ids and click histories."""

    def __init__(self) -> None:
        self.n, self.live, self.hist = 0, set(), {}
        self.states = [self.snap()]

    def snap(self) -> tuple[frozenset, tuple]:
        return frozenset(self.live), tuple(sorted((u, tuple(h)) for u, h in self.hist.items()))

    def run(self, eng: Engine, ops) -> int:
        """Apply `ops`; returns the index into `states` of the last saved state."""
        saved = 0
        for o in ops:
            if o[0] == "add":
                eng.add_items([item(self.n + j) for j in range(o[1])])
                self.live |= {f"i{self.n + j}" for j in range(o[1])}
                self.n += o[1]
            elif o[0] == "click" and self.live:
                target = sorted(self.live)[o[2] % len(self.live)]
                eng.record(f"u{o[1]}", target)
                self.hist.setdefault(f"u{o[1]}", []).append(target)
            elif o[0] == "remove" and self.live:
                target = sorted(self.live)[o[1] % len(self.live)]
                eng.remove_items([target])
                self.live.discard(target)
            elif o[0] == "save":
                eng.save()
                saved = len(self.states)
                self.states.append(self.snap())
                continue
            else:
                continue
            self.states.append(self.snap())
        return saved


def observed(eng: Engine, model: Model) -> tuple[frozenset, tuple]:
    live = frozenset(f"i{i}" for i in range(model.n) if f"i{i}" in eng)
    for iid in live:
        got = eng.get_item(iid)
        n = int(iid[1:])
        assert (got.title, got.text) == (item(n).title, item(n).text), f"{iid} read back wrong"
    hist = []
    for u in sorted(model.hist):
        try:
            h = eng.user_history(u)
        except KeyError:
            continue
        if h:
            hist.append((u, tuple(h)))
    return live, tuple(hist)


def build(folder: Path, ops) -> tuple[Path, Model, int]:
    path = folder / "store"
    model = Model()
    eng = Engine.create(path, encoder=FakeEncoder(16))
    saved = model.run(eng, ops)
    eng.close(save=False)
    return path, model, saved


def history_view(state):
    live, hist = state
    return live, tuple((u, h) for u, h in hist if h)


def damaged_targets(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_file() and p.name != "LOCK")


@bounded(25)
@given(st.lists(op, min_size=1, max_size=10), st.integers(0, 50), st.sampled_from(["cut", "flip"]),
       st.floats(0, 1, exclude_max=True), st.integers(1, 255), st.booleans())
def test_store_reads_back_an_acknowledged_prefix_or_names_the_damaged_file(ops, which, how, where, xor,
                                                                           read_only):
    with tempfile.TemporaryDirectory() as d:
        path, model, saved = build(Path(d), ops)
        names = damaged_targets(path)
        name = names[which % len(names)]
        p = path / name
        data = bytearray(p.read_bytes())
        if not data:
            return
        pos = int(where * len(data))
        if how == "cut":
            del data[pos:]
        else:
            data[pos] ^= xor
        p.write_bytes(bytes(data))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                eng = Engine.open(path, encoder=FakeEncoder(16), read_only=read_only)
        except StoreError as exc:
            assert name in str(exc), f"the error does not name {name}: {exc}"
            assert name.startswith(("events-", "manifest")) or "checksum" in str(exc) or "missing" in str(exc)
            return
        try:
            assert name.startswith("events-"), f"damage to {name} was loaded"
            seen = observed(eng, model)
            allowed = [history_view(s) for s in model.states[saved:]]
            assert history_view(seen) in allowed, "the store is not a prefix of what was acknowledged"
        finally:
            eng.close(save=False)


def resign(path: Path) -> None:
    """Make the manifest's checksums agree with the files again (a buggy writer, or an attacker)."""
    from engine.storage.store import StoreDir

    sd = StoreDir(path, read_only=True)
    manifest = sd.read_manifest()
    manifest["files"] = sd.describe([path / n for n in manifest["files"]])
    sd.write_manifest(manifest)


@bounded(25)
@given(st.lists(op, min_size=2, max_size=8), st.sampled_from(["index", "items", "users", "vectors"]),
       st.sampled_from(["cut", "flip"]), st.floats(0, 1, exclude_max=True), st.integers(1, 255))
def test_snapshot_damage_behind_valid_checksums_is_refused_or_harmless(ops, kind, how, where, xor):
    """With the checksums made consistent, a damaged snapshot file still opens only as a StoreError
    naming it, or as a store that works (for the index: with exactly the acknowledged state, the
    index having been checked, or rebuilt from the snapshot's vectors)."""
    with tempfile.TemporaryDirectory() as d:
        path, model, saved = build(Path(d), [*ops, ("save",)])
        names = [n for n in damaged_targets(path) if n.startswith(kind + "-")]
        if not names:
            return
        p = path / names[0]
        data = bytearray(p.read_bytes())
        pos = int(where * len(data))
        if how == "cut":
            del data[pos:]
        else:
            data[pos] ^= xor
        p.write_bytes(bytes(data))
        resign(path)
        try:
            eng = Engine.open(path, encoder=FakeEncoder(16), read_only=True)
        except StoreError as exc:
            assert names[0] in str(exc), f"the error does not name {names[0]}: {exc}"
            return
        try:
            eng.stats()
            if kind == "index":
                assert history_view(observed(eng, model)) == history_view(model.states[-1])
                live = sorted(model.states[-1][0])
                if live:
                    got = [r.item_id for r in eng.similar_items(live[0], k=len(live))]
                    assert set(got) <= set(live) and live[0] not in got
        finally:
            eng.close(save=False)

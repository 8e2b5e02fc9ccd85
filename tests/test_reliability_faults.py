"""Reliability, faults: SIGKILL mid-save/ingest (F1), disk full (F2), damaged files (F3), a damaged
event log (F4) and failing fsync (F5). See docs/reliability.md for the guarantees these check.

Real components throughout: real files, real FAISS, real subprocesses killed with SIGKILL, and (where
the kernel allows an unprivileged mount namespace) a real tmpfs that fills up. Only F2's portable
variant and F5 patch the OS call (os.fsync, a file's write) in-process, since a disk that fails
on demand cannot be made otherwise on an ordinary machine.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

HELPERS = Path(__file__).resolve().parent / "helpers"
sys.path.insert(0, str(HELPERS))

from rel_fakes import (  # noqa: E402
    FakeEncoder, env_long, fingerprint, generation_files, items, kill9, make_store, temp_files,
    shared_zygote, wait_for_line, worker_env,
)

import engine.storage.snapshot  # noqa: E402
from engine import CorruptStoreError, Engine, StoreError  # noqa: E402
from engine.storage.eventlog import TornTailWarning  # noqa: E402

LONG = env_long()
HEADER = struct.Struct("<IIQ")


def sized(short, long):
    """Parametrise a size: the short case always runs; the long one is `slow` and needs KINDLING_LONG=1."""
    return pytest.mark.parametrize("size", [
        pytest.param(short, id="short"),
        pytest.param(long, id="long", marks=[pytest.mark.slow, pytest.mark.skipif(
            not LONG, reason="long version; run with KINDLING_LONG=1 (make test-long)")]),
    ])


def open_quiet(path: Path, **kw) -> Engine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TornTailWarning)
        return Engine.open(path, encoder=FakeEncoder(), **kw)


def log_records(path: Path) -> list[tuple[int, int, int]]:
    """(offset, length, seq) of every record of a well-formed log file."""
    data, off, out = path.read_bytes(), 0, []
    while off < len(data):
        length, _, seq = HEADER.unpack_from(data, off)
        out.append((off, length, seq))
        off += HEADER.size + length
    return out


def current_log(eng_or_path) -> Path:
    p = Path(getattr(eng_or_path, "path", eng_or_path))
    return p / json.loads((p / "manifest.json").read_text())["log"]


# ---- F1: SIGKILL at random moments during save and ingest ---------------------------------------

class CrashModel:
    """What the parent knows: acknowledged events per user, live item ids, batches by name."""

    def __init__(self) -> None:
        self.histories: dict[str, list[str]] = {}
        self.live: set[str] = {f"base{i}" for i in range(200)}
        self.phases: Counter[str] = Counter()

    def check(self, eng: Engine, lines: list[str], tag: str) -> None:
        acked: dict[str, list[str]] = {}
        started, done = {}, set()
        for line in lines:
            kind, _, rest = line.partition(" ")
            if kind == "E":
                user, item = rest.split()
                acked.setdefault(user, []).append(item)
            elif kind in ("I", "R"):
                started[rest] = kind
            elif kind in ("i", "r"):  # by kind: a batch ingested, then removed in flight at the kill
                done.add((kind.upper(), rest))
        last = lines[-1].split(" ")[0] if lines else "ready"
        in_flight = {"S": "save", "I": "ingest", "R": "remove"}.get(last, "record")
        self.phases[in_flight] += 1
        # events: every acknowledged one is there, in order; at most the one in flight is extra
        extra = 0
        for user in {u for u in acked} | {f"{tag}-u{i}" for i in range(3)}:
            hist = history(eng, user)
            want = acked.get(user, [])
            assert hist[: len(want)] == want, f"acknowledged events of {user} lost: {want} vs {hist}"
            extra += len(hist) - len(want)
            self.histories[user] = hist
        assert extra <= (1 if in_flight == "record" else 0), f"{extra} unacknowledged events appeared"
        # batches: acknowledged ones whole, the one in flight all or nothing
        for name, kind in started.items():
            ids = [f"{name}{i}" for i in range(30)]
            present = sum(i in eng for i in ids)
            if kind == "I":
                if ("I", name) in done:
                    assert present == 30, f"acknowledged ingest {name}: only {present}/30 items"
                else:
                    assert present in (0, 30), f"half an ingest survived: {present}/30 of {name}"
                self.live |= set(ids) if present else set()
            for i in ids if present == 0 else ():
                self.live.discard(i)
        for name, kind in started.items():
            if kind == "R":
                ids = [f"{name}{i}" for i in range(30)]
                present = sum(i in eng for i in ids)
                if ("R", name) in done:
                    assert present == 0, f"acknowledged removal {name}: {present} items still there"
                assert present in (0, 30), f"half a removal survived: {present}/30 of {name}"
                if present == 0:
                    self.live -= set(ids)

    def check_whole(self, eng: Engine) -> None:
        for user, hist in self.histories.items():
            assert history(eng, user) == hist, f"history of {user} changed across restarts"
        missing = [i for i in self.live if i not in eng]
        assert not missing, f"committed items lost: {missing[:5]}"
        st = eng.stats()
        assert st["live_items"] == len(self.live), "unexpected live items"
        assert st["index"]["vectors"] - st["index"]["tombstones"] == st["live_items"], "index out of step"
        for user in list(self.histories)[-3:]:
            got = [r.item_id for r in eng.recommend(user, k=50)]
            assert set(got) <= self.live and len(got) == len(set(got))
        sample = sorted(self.live)[:: max(1, len(self.live) // 10)]
        for item in sample:
            assert all(r.item_id in self.live for r in eng.similar_items(item, k=5))


def history(eng: Engine, user: str) -> list[str]:
    try:
        return eng.user_history(user)
    except KeyError:  # UnknownUserError: no event of this user was ever acknowledged
        return []


@sized(8, 60)
def test_f1_sigkill_during_save_and_ingest(tmp_path, size):
    store = tmp_path / "store"
    eng = Engine.create(store, encoder=FakeEncoder())
    eng.ingest(items("base", 200), progress=False)
    eng.close()
    model, rng, zygote = CrashModel(), random.Random(1234), shared_zygote()
    for cycle in range(size):
        out = tmp_path / f"out-{cycle}.txt"
        pid = zygote.spawn(out, "crash", store, cycle, f"c{cycle}")
        wait_for_line(out, "ready\n", pid)
        time.sleep(rng.uniform(0.005, 0.25))
        kill9(pid)
        text = out.read_text()
        lines = text.split("\n")[1:-1]  # drop "ready" and a possibly partial last line
        eng = open_quiet(store)
        try:
            assert temp_files(store) == [], "temp files survived a reopen"
            model.check(eng, lines, f"c{cycle}")
            model.check_whole(eng)
        finally:
            eng.close(save=cycle % 2 == 0)
        eng = open_quiet(store, read_only=True)
        model.check_whole(eng)
        eng.close()
    print(f"\nF1: {size} kills, in flight at the kill: {dict(model.phases)}")
    if size >= 50:
        assert model.phases["save"] + model.phases["ingest"] >= size // 4, model.phases


# ---- F2: disk full ------------------------------------------------------------------------------

def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_f2_enospc_writing_snapshot_keeps_previous_state(tmp_path, monkeypatch):
    eng = make_store(tmp_path / "s", 60)
    eng.record("alice", "m1")
    before, files = fingerprint(eng), generation_files(eng.path)
    real = engine.storage.snapshot.save_file

    def half_then_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        data = Path(filename).read_bytes()
        Path(filename).write_bytes(data[: len(data) // 2])
        raise enospc()

    monkeypatch.setattr(engine.storage.snapshot, "save_file", half_then_full)
    with pytest.raises(StoreError, match="No space left"):
        eng.save()
    assert temp_files(eng.path) == [] and generation_files(eng.path) == files
    assert fingerprint(eng) == before
    monkeypatch.undo()
    eng.record("alice", "m2")
    eng.save()
    eng.close()
    eng = open_quiet(tmp_path / "s")
    assert eng.user_history("alice") == ["m1", "m2"]
    eng.close()


def test_f2_enospc_during_ingest_leaves_nothing_half_done(tmp_path, monkeypatch):
    eng = make_store(tmp_path / "s", 40)
    before, files = fingerprint(eng), generation_files(eng.path)
    import pyarrow.parquet as pq
    real = pq.write_table
    calls = []

    def full_on_second(table, where, **kw):
        calls.append(where)
        if len(calls) == 2:
            raise enospc()
        return real(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", full_on_second)
    with pytest.raises(StoreError, match="No space left"):
        eng.ingest(items("new", 25), progress=False)
    monkeypatch.undo()
    assert "new0" not in eng and "new24" not in eng, "a failed ingest stayed in memory"
    assert fingerprint(eng) == before and temp_files(eng.path) == [] and generation_files(eng.path) == files
    eng.record("bob", "m3")  # acknowledged after the failure: must survive with the old state
    eng.close(save=False)
    eng = open_quiet(tmp_path / "s")
    assert "new0" not in eng and eng.user_history("bob") == ["m3"]
    assert eng.ingest(items("new", 25), progress=False) == 25
    eng.close()


class FailingFile:
    """Stands in for the log's file object: the payload reaches the disk, then the flush/close fail."""

    def __init__(self, real, fail_write: bool) -> None:
        self.real, self.fail_write = real, fail_write

    def tell(self):
        return self.real.tell()

    def write(self, blob):
        if self.fail_write:
            self.real.write(blob[: len(blob) // 2])
            self.real.flush()
            raise enospc()
        return self.real.write(blob)

    def flush(self):
        self.real.flush()
        raise enospc()

    def fileno(self):
        return self.real.fileno()

    @property
    def closed(self):
        return self.real.closed

    def close(self):
        self.real.close()  # the buffered bytes do reach the file, then the close reports an error
        raise enospc()


@pytest.mark.parametrize("fail_write", [True, False], ids=["partial-write", "failed-flush"])
def test_f2_enospc_appending_event_is_not_acknowledged(tmp_path, fail_write):
    eng = make_store(tmp_path / "s", 30)
    eng.record("alice", "m1")
    size = current_log(eng).stat().st_size
    eng._core.log._fh = FailingFile(eng._core.log._fh, fail_write)
    with pytest.raises(StoreError, match="not recorded"):
        eng.record("alice", "m2")
    assert eng.user_history("alice") == ["m1"]
    assert current_log(eng).stat().st_size == size, "a failed append left bytes in the log"
    eng.record("alice", "m3")
    eng.close(save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TornTailWarning)
        eng = Engine.open(tmp_path / "s", encoder=FakeEncoder())
    assert eng.user_history("alice") == ["m1", "m3"]
    eng.close()


def unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                        "mount -t tmpfs -o size=64k tmpfs /mnt 2>/dev/null || mount -t tmpfs -o size=64k tmpfs /tmp"],
                       capture_output=True, timeout=20)
    return r.returncode == 0


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux mount namespaces")
def test_f2_real_full_disk_on_tmpfs(tmp_path):
    """A real filesystem that fills up: a 1 MiB tmpfs in a private mount namespace."""
    if not unshare_works():
        pytest.skip("unprivileged mount namespaces are not available here")
    mnt, out = tmp_path / "mnt", tmp_path / "out"
    mnt.mkdir()
    out.mkdir()
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && exec {sys.executable} "
              f"{HELPERS / 'rel_enospc.py'} {mnt} {out}")
    r = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                       capture_output=True, text=True, timeout=180, env=worker_env())
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["failures"] == [], report
    assert report["refused"]["record"] and report["refused"]["save"] and report["refused"]["ingest"], report
    eng = open_quiet(out / "store")
    try:
        for user, hist in report["acked"].items():
            assert eng.user_history(user) == hist
        assert "full0" not in eng and all(f"m{i}" in eng for i in range(100))
    finally:
        eng.close()


# ---- F3: damaged files ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    path = tmp_path_factory.mktemp("f3") / "store"
    eng = make_store(path, 120)
    for i in range(40):
        eng.record(f"u{i % 4}", f"m{(i * 7) % 120}", "click" if i % 3 else "skip")
    eng.set_profile("u9", "space robots and jazz")
    eng.remove_items(["m5", "m6"])
    eng.save()
    eng.close()
    return path


def store_files(path: Path) -> list[str]:
    manifest = json.loads((path / "manifest.json").read_text())
    return sorted(manifest["files"]) + ["manifest.json"]


def damage_cases(path: Path, n_flips: int, seed: int = 7):
    rng = random.Random(seed)
    for name in store_files(path):
        size = (path / name).stat().st_size
        yield name, "truncated-half", lambda b: b[: len(b) // 2]
        yield name, "truncated-empty", lambda b: b""
        yield name, "truncated-last-byte", lambda b: b[:-1]
        for _ in range(n_flips):
            pos, bit = rng.randrange(size), 1 << rng.randrange(8)
            yield name, f"bitflip@{pos}", (lambda b, pos=pos, bit=bit: b[:pos] + bytes([b[pos] ^ bit]) + b[pos + 1:])


@sized(4, 60)
def test_f3_damaged_file_is_named_never_loaded(pristine, tmp_path, size):
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    bad = []
    for name, how, damage in damage_cases(store, size):
        p = store / name
        original = p.read_bytes()
        p.write_bytes(damage(original))
        try:
            eng = Engine.open(store, encoder=FakeEncoder(), read_only=True)
        except StoreError as exc:  # CorruptStoreError, or StoreError for a manifest that is not one
            if name not in str(exc):
                bad.append(f"{name} {how}: error does not name the file: {exc}")
        except Exception as exc:  # noqa: BLE001 - anything else is a crash
            bad.append(f"{name} {how}: {type(exc).__name__}: {exc}")
        else:
            eng.close()
            bad.append(f"{name} {how}: opened without an error")
        finally:
            p.write_bytes(original)
    assert not bad, "\n".join(bad[:20])


@sized(300, 100_000)
def test_f3_every_manifest_bitflip_is_caught(pristine, tmp_path, size):
    """Every single-bit flip of the manifest (all of them in the long run) is refused."""
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    p = store / "manifest.json"
    original = p.read_bytes()
    flips = [(pos, 1 << b) for pos in range(len(original)) for b in range(8)]
    if size < len(flips):
        flips = random.Random(3).sample(flips, size)
    opened = []
    for pos, bit in flips:
        p.write_bytes(original[:pos] + bytes([original[pos] ^ bit]) + original[pos + 1:])
        try:
            Engine.open(store, encoder=FakeEncoder(), read_only=True).close()
            opened.append((pos, bit, original[max(0, pos - 20): pos + 20]))
        except StoreError as exc:
            assert "manifest.json" in str(exc) or any(n in str(exc) for n in store_files(store))
    p.write_bytes(original)
    assert not opened, f"{len(opened)} flips opened silently, e.g. {opened[:3]}"


def rewrite_manifest(store: Path) -> None:
    """Recompute the manifest's checksums after a damage, as a buggy writer (or an attacker) would."""
    from engine.storage.store import StoreDir

    sd = StoreDir(store, read_only=True)
    manifest = sd.read_manifest()
    manifest["files"] = sd.describe([store / n for n in manifest["files"]])
    sd.write_manifest(manifest)


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _foreign_index(p: Path) -> None:
    import faiss

    idx = faiss.IndexIDMap2(faiss.IndexFlatIP(32))
    idx.add_with_ids(np.eye(32, dtype=np.float32)[:3], np.arange(3, dtype=np.int64))
    faiss.write_index(idx, str(p))


def _parquet_missing_column(p: Path) -> None:
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(p).drop_columns(["removed"] if "removed" in pq.read_table(p).column_names
                                                 else ["clicks"]), p)


def _tensors_missing_key(p: Path) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(str(p))
    t.pop(max(sorted(t), key=lambda k: t[k].size))  # the biggest: weights a store cannot do without
    save_file(t, str(p))


@pytest.mark.parametrize("kind,damage", [
    ("index", _truncate), ("index", _foreign_index), ("items", _truncate), ("items", _parquet_missing_column),
    ("users", _parquet_missing_column), ("vectors", _truncate), ("vectors", _tensors_missing_key),
    ("models", _truncate), ("models", _tensors_missing_key),
], ids=lambda v: getattr(v, "__name__", v))
def test_f3_damage_behind_valid_checksums_is_still_an_error(pristine, tmp_path, kind, damage):
    """Defence in depth: with the checksums recomputed, the readers themselves still refuse."""
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    names = [n for n in store_files(store) if n.startswith(kind + "-")]
    if not names:
        pytest.skip(f"this store has no {kind} file (nothing trained writes one yet)")
    name = names[0]
    damage(store / name)
    rewrite_manifest(store)
    with pytest.raises(CorruptStoreError, match=name.split(".")[0]):
        Engine.open(store, encoder=FakeEncoder(), read_only=True)


# ---- F4: a damaged event log ---------------------------------------------------------------------

def logged_store(path: Path, n_events: int = 12) -> tuple[Path, list[str]]:
    eng = make_store(path, 30)
    clicks = [f"m{(i * 5) % 30}" for i in range(n_events)]
    for item in clicks:
        eng.record("alice", item)
    log = current_log(eng)
    eng.close(save=False)
    return log, clicks


def test_f4_torn_tail_dropped_with_warning_then_log_usable(tmp_path):
    log, clicks = logged_store(tmp_path / "s")
    full = log.read_bytes()
    last_off, last_len, _ = log_records(log)[-1]
    cuts = sorted({last_off + 1, last_off + HEADER.size - 1, last_off + HEADER.size,
                   last_off + HEADER.size + last_len // 2, len(full) - 1})
    for cut in cuts:
        log.write_bytes(full[:cut])
        with pytest.warns(TornTailWarning, match=f"offset {last_off}"):
            eng = Engine.open(tmp_path / "s", encoder=FakeEncoder())
        assert eng.user_history("alice") == clicks[:-1], f"cut at {cut}"
        assert log.stat().st_size == last_off, "the torn tail was not cut off"
        eng.record("alice", "m29")
        eng.close(save=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", TornTailWarning)
            eng = Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=True)
        assert eng.user_history("alice") == clicks[:-1] + ["m29"]
        eng.close()


def test_f4_torn_tail_read_only_open_warns_and_leaves_file(tmp_path):
    log, clicks = logged_store(tmp_path / "s")
    log.write_bytes(log.read_bytes()[:-3])
    size = log.stat().st_size
    with pytest.warns(TornTailWarning):
        eng = Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=True)
    assert eng.user_history("alice") == clicks[:-1] and log.stat().st_size == size
    eng.close()


@pytest.mark.parametrize("where", ["payload", "crc", "seq", "length-grow", "length-shrink", "length-huge"])
@pytest.mark.parametrize("record", [0, 5])
def test_f4_corruption_in_the_middle_is_an_error_with_offset(tmp_path, where, record):
    log, _ = logged_store(tmp_path / "s")
    data = bytearray(log.read_bytes())
    off, length, _ = log_records(log)[record]
    pos = {"payload": off + HEADER.size + length // 2, "crc": off + 5, "seq": off + 8,
           "length-grow": off, "length-shrink": off, "length-huge": off + 3}[where]
    if where == "length-grow":
        struct.pack_into("<I", data, off, length + 40)
    elif where == "length-shrink":
        struct.pack_into("<I", data, off, length - 10)
    else:
        data[pos] ^= 0x10
    log.write_bytes(bytes(data))
    for read_only in (False, True):
        with pytest.raises(CorruptStoreError, match=rf"{log.name}.*offset {off}\b"):
            Engine.open(tmp_path / "s", encoder=FakeEncoder(), read_only=read_only)
    assert log.read_bytes() == bytes(data), "a failed open changed the log"


def test_f4_record_from_another_log_is_refused(tmp_path):
    """A record with a valid CRC but the wrong sequence number (e.g. a stale log) is not replayed."""
    log, _ = logged_store(tmp_path / "s")
    recs = log_records(log)
    data = log.read_bytes()
    first = data[recs[0][0]: recs[1][0]]
    log.write_bytes(data + first)  # a valid record again, with an old sequence number
    with pytest.raises(CorruptStoreError, match="sequence"):
        Engine.open(tmp_path / "s", encoder=FakeEncoder())


# ---- F5: failing fsync ---------------------------------------------------------------------------

def failing_fsync(monkeypatch, only_dirs: bool = False):
    import stat

    real = os.fsync

    def fsync(fd):
        if only_dirs and not stat.S_ISDIR(os.fstat(fd).st_mode):
            return real(fd)
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(os, "fsync", fsync)


def test_f5_failed_fsync_of_event_is_not_acknowledged(tmp_path, monkeypatch):
    eng = make_store(tmp_path / "s", 30)
    eng.record("alice", "m1")
    failing_fsync(monkeypatch)
    with pytest.raises(StoreError, match="not recorded"):
        eng.record("alice", "m2")
    with pytest.raises(StoreError):
        eng.add_items(items("x", 2))
    with pytest.raises(StoreError):
        eng.remove_items(["m3"])
    assert eng.user_history("alice") == ["m1"] and "x0" not in eng and "m3" in eng
    monkeypatch.undo()
    eng.record("alice", "m4")
    eng.close(save=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TornTailWarning)
        eng = Engine.open(tmp_path / "s", encoder=FakeEncoder())
    assert eng.user_history("alice") == ["m1", "m4"] and "x0" not in eng and "m3" in eng
    eng.close()


@pytest.mark.parametrize("op", ["save", "ingest"])
def test_f5_failed_fsync_of_snapshot_is_not_acknowledged(tmp_path, monkeypatch, op):
    eng = make_store(tmp_path / "s", 30)
    eng.record("alice", "m1")
    before, files = fingerprint(eng), generation_files(eng.path)
    failing_fsync(monkeypatch)
    with pytest.raises(StoreError):
        eng.save() if op == "save" else eng.ingest(items("x", 5), progress=False)
    monkeypatch.undo()
    assert fingerprint(eng) == before and temp_files(eng.path) == [] and generation_files(eng.path) == files
    assert "x0" not in eng and eng.user_history("alice") == ["m1"]
    eng.record("alice", "m2")
    eng.close(save=False)
    eng = open_quiet(tmp_path / "s")
    assert eng.user_history("alice") == ["m1", "m2"] and "x0" not in eng
    eng.close()


def test_f5_failed_directory_fsync_after_manifest_swap_loses_nothing(tmp_path, monkeypatch):
    """The manifest was swapped but its directory fsync failed: the save is not acknowledged, and
    events acknowledged afterwards still reach the log that the swapped manifest names."""
    eng = make_store(tmp_path / "s", 30)
    eng.record("alice", "m1")
    failing_fsync(monkeypatch, only_dirs=True)
    with pytest.raises(StoreError):
        eng.save()
    monkeypatch.undo()
    eng.record("alice", "m2")
    eng.close(save=False)
    eng = open_quiet(tmp_path / "s")
    assert eng.user_history("alice") == ["m1", "m2"]
    assert temp_files(eng.path) == []
    eng.close()

"""The store on disk: round-trips, manifest, file formats, atomic save, log replay, locking."""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import (
    Config, CorruptStoreError, Engine, InvalidInputError, Item, StoreError, StoreLockedError,
)
from engine.storage.eventlog import read_log
from engine.storage.store import FORMAT_VERSION

from conftest import FakeEncoder, small_catalog

USERS = ("ann", "bob", "cy")


def populate(eng: Engine) -> None:
    eng.add_items(small_catalog())
    eng.recommend("ann", k=3, profile="rocket orbit space")
    eng.recommend("bob", k=3, profile="baking bread oven")
    for user, item, kind in [("ann", "space-1", "click"), ("ann", "food-0", "skip"),
                             ("bob", "food-1", "click"), ("bob", "ball-2", "impression"),
                             ("cy", "ball-0", "click"), ("cy", "ball-1", "click")]:
        eng.record(user, item, kind)
    eng.remove_items(["space-3"])
    eng.add_items([Item("new-1", "New rocket", "rocket launch moon mission", ("space",))])


def observe(eng: Engine) -> dict:
    """Everything a caller can see: lists with scores, neighbours, histories, stats."""
    out = {u: [(r.item_id, round(r.score, 6)) for r in eng.recommend(u, k=8)] for u in USERS}
    out["new-user"] = [(r.item_id, round(r.score, 6)) for r in eng.recommend("nobody", k=5)]
    out["similar"] = [(r.item_id, round(r.score, 6)) for r in eng.similar_items("space-0", k=5)]
    out["history"] = {u: eng.user_history(u) for u in USERS}
    stats = eng.stats()
    out["stats"] = {k: stats[k] for k in ("items", "live_items", "users", "removed_items", "events",
                                         "index", "trained")}
    return out


def store_files(path: Path) -> set[str]:
    return {p.name for p in path.iterdir()}


def test_round_trip_after_save(tmp_path, fake_encoder):
    eng = Engine.create(tmp_path / "s", encoder=fake_encoder)
    populate(eng)
    eng.save()
    before = observe(eng)
    eng.close()
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as again:
        assert observe(again) == before
        assert again.stats()["pending_log_records"] == 0


def test_round_trip_by_log_replay_after_unsaved_close(tmp_path, fake_encoder):
    eng = Engine.create(tmp_path / "s", encoder=fake_encoder)
    populate(eng)
    before = observe(eng)
    pending = eng.stats()["pending_log_records"]
    assert pending > 0
    eng.close(save=False)
    snapshot_items = pq.read_table(next((tmp_path / "s").glob("items-*.parquet")))
    assert snapshot_items.num_rows == 0  # nothing but the log holds the items
    with Engine.open(tmp_path / "s", encoder=fake_encoder, read_only=True) as ro:
        assert observe(ro) == before
        assert ro.stats()["pending_log_records"] == pending
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as again:
        assert observe(again) == before
        again.record("cy", "ball-2", "click")
        after = observe(again)
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as third:  # closed with a save this time
        assert observe(third) == after
        assert third.stats()["pending_log_records"] == 0


def test_manifest_has_format_version_and_checksums(tmp_path, fake_encoder):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        populate(eng)
        eng.save()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["format"] == "kindling-store" and manifest["format_version"] == FORMAT_VERSION
    assert manifest["config"] == Config().to_dict()
    assert manifest["model"]["dim"] == fake_encoder.dim
    files = manifest["files"]
    on_disk = store_files(tmp_path / "s") - {"manifest.json", "LOCK", manifest["log"]}
    assert set(files) == on_disk and any(n.endswith(".faiss") for n in files)
    for name, meta in files.items():
        data = (tmp_path / "s" / name).read_bytes()
        assert meta["bytes"] == len(data)
        assert meta["sha256"] == hashlib.sha256(data).hexdigest()


def _file_format(path: Path) -> str:
    data = path.read_bytes()
    name = path.name
    if name == "LOCK":
        return "lock" if data.startswith(b"pid ") or not data else "unknown"
    if name == "manifest.json":
        json.loads(data)
        return "json"
    if name.endswith(".parquet"):
        return "parquet" if data[:4] == b"PAR1" and data[-4:] == b"PAR1" else "unknown"
    if name.endswith(".safetensors"):
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
        return "safetensors" if all("dtype" in v for k, v in header.items() if k != "__metadata__") \
            else "unknown"
    if name.endswith(".faiss"):
        return "faiss" if data[:4] in (b"IxMp", b"IxM2") else "unknown"  # IndexIDMap's (IDMap2's) fourcc
    if name.endswith(".log"):
        list(read_log(path))  # every byte belongs to a CRC-checked JSON record
        return "log"
    return "unknown"


def test_no_pickle_anywhere_in_the_store(tmp_path, fake_encoder):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        populate(eng)
        eng.save()
        eng.record("ann", "ball-3", "click")  # leave a non-empty log too
        eng.close(save=False)
    formats = {}
    for p in (tmp_path / "s").iterdir():
        data = p.read_bytes()
        # the pickle protocol 2-5 header; safetensors, Parquet, FAISS and JSON never start so
        assert not (len(data) > 1 and data[0] == 0x80 and 2 <= data[1] <= 5 and p.suffix != ".log"), p
        formats[p.name] = _file_format(p)
    assert "unknown" not in formats.values(), formats
    assert {"parquet", "safetensors", "faiss", "log", "json", "lock"} <= set(formats.values())


def test_save_cleans_old_generations(tmp_path, fake_encoder):
    eng = Engine.create(tmp_path / "s", encoder=fake_encoder)
    populate(eng)
    for _ in range(3):
        eng.record("ann", "ball-1", "impression")
        eng.save()
    gen = eng.stats()["generation"]
    eng.close()
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    expected = set(manifest["files"]) | {"manifest.json", "LOCK", manifest["log"]}
    assert store_files(tmp_path / "s") == expected
    assert all(f"-{gen:06d}." in n for n in expected - {"manifest.json", "LOCK"})
    assert not any(n.startswith(".") for n in store_files(tmp_path / "s"))


def test_open_removes_leftovers_of_a_crashed_save(tmp_path, fake_encoder):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        populate(eng)
    stray = [tmp_path / "s" / ".items-000009.parquet.tmp-4242", tmp_path / "s" / "items-000009.parquet",
             tmp_path / "s" / "events-000009.log"]
    for p in stray:
        p.write_bytes(b"half written")
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as eng:
        assert eng.stats()["live_items"] == 12
    assert not any(p.exists() for p in stray)


def test_a_crash_during_save_keeps_the_old_generation_and_the_log(tmp_path, fake_encoder, monkeypatch):
    eng = Engine.create(tmp_path / "s", encoder=fake_encoder)
    populate(eng)
    eng.save()
    eng.record("ann", "ball-3", "click")
    before = observe(eng)
    gen = eng.stats()["generation"]

    def crash(manifest):
        raise OSError("simulated crash before the manifest swap")

    monkeypatch.setattr(eng._core.store, "write_manifest", crash)
    with pytest.raises(OSError, match="simulated crash"):
        eng.save()
    eng.close(save=False)
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as again:
        assert again.stats()["generation"] == gen
        assert observe(again) == before


def test_checksum_mismatch_names_the_file(tmp_path, fake_encoder):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        populate(eng)
    victim = next((tmp_path / "s").glob("items-*.parquet"))
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=victim.name):
        Engine.open(tmp_path / "s", encoder=fake_encoder)
    victim.unlink()
    with pytest.raises(CorruptStoreError, match="missing"):
        Engine.open(tmp_path / "s", encoder=fake_encoder)


def test_a_version_1_store_opens_and_is_saved_as_version_2(tmp_path, fake_encoder):
    """Version 1 had no event identities, no held, dislikes or expires_at column, and untrained reranker weights in the
    models file; such a store opens, keeps its state, and is written back as version 2."""
    import pyarrow.parquet as pq
    from safetensors.numpy import load_file, save_file

    from engine.models.rerank import Reranker
    from engine.storage.store import manifest_digest, sha256_file

    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        populate(eng)
        lists = {u: [r.item_id for r in eng.recommend(u, k=5)] for u in ("ann", "bob", "cy", "nobody")}
    store = tmp_path / "s"
    manifest = json.loads((store / "manifest.json").read_text())
    for name in manifest["files"]:
        path = store / name
        if name.startswith("vectors-"):
            save_file({k: v for k, v in load_file(str(path)).items() if k != "event_keys"}, str(path))
        elif name.startswith("items-"):
            pq.write_table(pq.read_table(path).drop(["expires_at"]), path)
        elif name.startswith("users-"):
            pq.write_table(pq.read_table(path).drop(["held", "dislikes"]), path)
        elif name.startswith("models-"):
            old = Reranker(32, 0.0, 8, 2, 0)
            old.weights  # noqa: B018 - version 1 saved the untrained weights
            save_file({**load_file(str(path)), **old.tensors()}, str(path))
        manifest["files"][name] = {"bytes": path.stat().st_size, "sha256": sha256_file(path)}
    manifest["format_version"] = 1
    manifest["checksum"] = manifest_digest(manifest)
    (store / "manifest.json").write_text(json.dumps(manifest))
    with Engine.open(store, encoder=fake_encoder) as eng:
        assert {u: [r.item_id for r in eng.recommend(u, k=5)] for u in lists} == lists
        eng.record("cy", "food-3")
    assert json.loads((store / "manifest.json").read_text())["format_version"] == FORMAT_VERSION == 2


def test_failed_open_releases_the_lock(tmp_path, fake_encoder):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        populate(eng)
    manifest = tmp_path / "s" / "manifest.json"
    good = manifest.read_text()
    future = json.loads(good)
    future["format_version"] = 99
    if "checksum" in future:  # a manifest that checks itself must stay valid to reach the version check
        from engine.storage.store import manifest_digest

        future["checksum"] = manifest_digest(future)
    manifest.write_text(json.dumps(future))
    with pytest.raises(StoreError, match="format version 99 is not supported"):
        Engine.open(tmp_path / "s", encoder=fake_encoder)
    manifest.write_text(good)
    Engine.open(tmp_path / "s", encoder=fake_encoder).close()  # not locked by the failed attempt


def test_one_writer_many_readers(tmp_path, fake_encoder):
    eng = Engine.create(tmp_path / "s", encoder=fake_encoder)
    populate(eng)
    try:
        with pytest.raises(StoreLockedError, match="locked for writing"):
            Engine.open(tmp_path / "s", encoder=fake_encoder)
        with Engine.open(tmp_path / "s", encoder=fake_encoder, read_only=True) as ro:
            assert ro.stats()["live_items"] == 12
            with pytest.raises(StoreError, match="read-only"):
                ro.record("ann", "ball-0")
    finally:
        eng.close()


@pytest.mark.parametrize("setup, rule", [
    ("missing", "no such store"),
    ("file", "this is a file"),
    ("empty-dir", "not a Kindling store"),
])
def test_open_refuses_what_is_not_a_store(tmp_path, setup, rule):
    p = tmp_path / "x"
    if setup == "file":
        p.write_text("hello")
    elif setup == "empty-dir":
        p.mkdir()
    with pytest.raises(StoreError, match=rule):
        Engine.open(p)


def test_create_refuses_a_non_empty_directory(tmp_path, fake_encoder):
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "precious.txt").write_text("do not touch")
    with pytest.raises(StoreError, match="not an empty directory"):
        Engine.create(tmp_path / "s", encoder=fake_encoder)
    assert (tmp_path / "s" / "precious.txt").read_text() == "do not touch"


def test_oversized_log_record_is_refused_before_it_is_written(engine, monkeypatch):
    import engine.storage.eventlog as eventlog

    monkeypatch.setattr(eventlog, "MAX_RECORD", 6_000)  # above the catalog's own record
    many = [Item(f"bulk-{n}", f"Bulk {n}", "bulk words") for n in range(40)]
    with pytest.raises(InvalidInputError, match="at most 6,000 bytes"):
        engine.add_items(many)
    assert "bulk-0" not in engine
    path = engine.path
    engine.close(save=False)
    with Engine.open(path, encoder=FakeEncoder()) as again:  # the log is still readable
        assert again.stats()["live_items"] == 12


# ---- property: any sequence of operations survives save + reopen and log replay ----------------

op = st.one_of(
    st.tuples(st.just("click"), st.sampled_from(USERS), st.integers(0, 11)),
    st.tuples(st.just("skip"), st.sampled_from(USERS), st.integers(0, 11)),
    st.tuples(st.just("remove"), st.integers(0, 11)),
    st.tuples(st.just("add"), st.integers(0, 11)),
    st.tuples(st.just("save")),
)


def _run(eng: Engine, ops) -> None:
    cat = small_catalog()
    for o in ops:
        if o[0] in ("click", "skip") and cat[o[2]].item_id in eng:
            eng.record(o[1], cat[o[2]].item_id, o[0])
        elif o[0] == "remove" and cat[o[1]].item_id in eng and eng.stats()["live_items"] > 1:
            eng.remove_items([cat[o[1]].item_id])
        elif o[0] == "add":
            eng.add_items([Item(cat[o[1]].item_id, "Again", "moon goal oven words")], upsert=True)
        elif o[0] == "save":
            eng.save()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=12), st.booleans())
def test_any_history_round_trips(ops, save_at_end):
    enc = FakeEncoder()
    with tempfile.TemporaryDirectory() as d:
        eng = Engine.create(Path(d) / "s", encoder=enc)
        eng.add_items(small_catalog())
        _run(eng, ops)
        before = {u: [(r.item_id, round(r.score, 6)) for r in eng.recommend(u, k=6)] for u in USERS}
        live = sorted(i.item_id for i in small_catalog() if i.item_id in eng)
        eng.close(save=save_at_end)
        with Engine.open(Path(d) / "s", encoder=enc) as again:
            assert {u: [(r.item_id, round(r.score, 6)) for r in again.recommend(u, k=6)]
                    for u in USERS} == before
            assert sorted(i.item_id for i in small_catalog() if i.item_id in again) == live
            assert np.isfinite(again._core.state.index.ntotal)

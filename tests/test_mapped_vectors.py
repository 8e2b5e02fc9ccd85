"""One copy of the item vectors: a store opened from a snapshot maps its vectors file (no copy in
the process's own memory), and adds, upserts, removes and saves keep working on top of the map."""

from __future__ import annotations

import hashlib
import json
import mmap
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from engine import Config, CorruptStoreError, Engine, Item
from engine.storage.mapped import map_tensors
from engine.text.catalog import item_text

from conftest import FakeEncoder, small_catalog

USERS = ("ann", "bob", "cy", "nobody")


def populate(eng: Engine) -> None:
    eng.add_items(small_catalog())
    eng.recommend("ann", k=3, profile="rocket orbit space")
    for user, item in [("ann", "space-1"), ("bob", "food-1"), ("cy", "ball-0"), ("cy", "ball-1")]:
        eng.record(user, item)


def lists(eng: Engine) -> dict[str, list[tuple[str, float]]]:
    out = {u: [(r.item_id, round(r.score, 6)) for r in eng.recommend(u, k=8)] for u in USERS}
    out["similar"] = [(r.item_id, round(r.score, 6)) for r in eng.similar_items("food-2", k=5)]
    return out


def mapped(arr: np.ndarray) -> bool:
    """Whether `arr` is a view of a memory map (not memory of its own)."""
    while arr is not None and not isinstance(arr, mmap.mmap):
        arr = getattr(arr, "base", None)
    return isinstance(arr, mmap.mmap)


def items_of(eng: Engine):
    return eng._core.state.items  # read-only look inside: which rows are mapped


def vectors_file(store: Path) -> Path:
    files = json.loads((store / "manifest.json").read_text())["files"]
    return store / next(n for n in files if n.startswith("vectors-"))


def test_a_reopened_store_serves_the_same_lists_from_the_mapped_vectors(tmp_path, fake_encoder):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        populate(eng)
        before, vecs = lists(eng), items_of(eng).vectors.copy()
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as eng:
        items = items_of(eng)
        assert mapped(items.vectors) and len(items._tail) == 0
        np.testing.assert_array_equal(items.vectors, vecs)
        assert lists(eng) == before
        assert all(r.because for r in eng.recommend("ann", k=3, explain=True))  # raw rows, explained


def test_add_upsert_remove_after_open_survive_a_save_and_reopen(tmp_path, fake_encoder):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        populate(eng)
    store = tmp_path / "s"
    old_file = vectors_file(store)
    digest = hashlib.sha256(old_file.read_bytes()).hexdigest()
    with Engine.open(store, encoder=fake_encoder) as eng:
        eng.add_items([Item("new-1", "New rocket", "rocket launch moon mission", ("space",))])
        eng.add_items([Item("food-2", "Soup", "rocket orbit galaxy stars", ("space",))], upsert=True)
        eng.remove_items(["ball-3"])
        items = items_of(eng)
        row_new, row_up = items.vocab.row("new-1"), items.vocab.row("food-2")
        assert row_new >= len(items._base) and row_up < len(items._base)  # the tail; a mapped row
        expect = fake_encoder.encode([item_text(eng.get_item("new-1")), item_text(eng.get_item("food-2"))])
        got = items.vector_rows(np.array([row_new, row_up]))
        np.testing.assert_array_equal(got, expect)
        np.testing.assert_array_equal(items.vectors[[row_new, row_up]], got)
        assert hashlib.sha256(old_file.read_bytes()).hexdigest() == digest  # copy-on-write: file untouched
        after_edits, vecs = lists(eng), items.vectors.copy()
        eng.save()
        assert mapped(items.vectors) and len(items._tail) == 0  # the new snapshot, mapped again
        assert not old_file.exists()
        np.testing.assert_array_equal(items.vectors, vecs)
        assert lists(eng) == after_edits
        eng.add_items([Item("new-2", "Pasta", "pasta recipe tomato", ("food",))])  # a tail after a save
        after_edits = lists(eng)
    with Engine.open(store, encoder=fake_encoder) as eng:
        assert lists(eng) == after_edits
        assert "ball-3" not in eng and "new-2" in eng
        assert eng.get_item("food-2").title == "Soup"


def test_a_running_reader_outlives_the_deletion_of_its_mapped_generation(tmp_path, fake_encoder):
    with Engine.create(tmp_path / "s", encoder=fake_encoder) as eng:
        populate(eng)
    store = tmp_path / "s"
    old_file = vectors_file(store)
    writer = Engine.open(store, encoder=fake_encoder)
    reader = Engine.open(store, encoder=fake_encoder, read_only=True)
    try:
        expect, vecs = lists(reader), items_of(reader).vectors.copy()
        writer.add_items([Item("new-1", "New rocket", "rocket launch moon mission", ("space",))])
        writer.save()
        writer.record("ann", "new-1")
        writer.save()
        assert not old_file.exists()  # the reader's mapped file has no name any more
        assert lists(reader) == expect
        np.testing.assert_array_equal(items_of(reader).vectors, vecs)  # every page still readable
        assert [r.item_id for r in writer.recommend("bob", k=3)]
    finally:
        reader.close()
        writer.close()


def test_map_tensors_reads_what_safetensors_wrote_and_refuses_damage(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.arange(5, dtype=np.uint64),
               "c": np.zeros((0, 4), np.float32), "d": np.ones(3, np.float16)}
    save_file(tensors, str(path))
    got = map_tensors(path)
    assert set(got) == set(tensors)
    for k, v in load_file(str(path)).items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        np.testing.assert_array_equal(got[k], v)
    got["a"][0, 0] = 99.0  # copy-on-write: the process sees it, the file does not
    assert load_file(str(path))["a"][0, 0] == 0.0
    raw = path.read_bytes()
    path.write_bytes(raw[:-2])
    with pytest.raises(CorruptStoreError, match="t.safetensors"):
        map_tensors(path)
    path.write_bytes((10**12).to_bytes(8, "little") + raw[8:])
    with pytest.raises(CorruptStoreError, match="header length"):
        map_tensors(path)


RSS_SCRIPT = r"""
import json, sys
import numpy as np
from engine import Engine
sys.path.insert(0, sys.argv[3])
from conftest import FakeEncoder

def anon(field="RssAnon:"):
    import ctypes, gc
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))

with Engine.open(sys.argv[2]) as eng:  # every library and lazy import in, before the baseline
    eng.recommend("u0", 5)
a0, f0 = anon(), anon("RssFile:")
eng = Engine.open(sys.argv[1])
a1 = anon()
for i in range(200):
    eng.recommend(f"u{i % 20}", 10)
print(json.dumps({"open": a1 - a0, "served": anon() - a0, "served_file": anon("RssFile:") - f0}))
eng.close(save=False)
"""


class _Lookup(FakeEncoder):
    """Item "i<j>" embeds to row j of `vecs`: a big catalog without hashing every text."""

    def __init__(self, vecs: np.ndarray) -> None:
        super().__init__(vecs.shape[1])
        self.vecs = vecs

    def encode(self, texts):
        return self.vecs[[int(t.split()[-1]) for t in texts]]


def _store(path: Path, n: int, dim: int, kind: str = "auto") -> None:
    from engine import Config, Event

    vecs = np.random.default_rng(n).standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with Engine.create(path, Config(fsync=False, index=kind), encoder=_Lookup(vecs)) as eng:
        eng.ingest([Item(f"i{j}", f"item {j}") for j in range(n)], progress=False)  # no log record
        eng.record_many([Event(f"u{j % 20}", f"i{(j * 7919) % n}", "click") for j in range(100)])


def test_opening_and_serving_a_20k_item_store_does_not_read_its_vectors_into_memory(tmp_path):
    """RssAnon grows by the index (an exact one here: a full float32 copy, read from its own file)
    and by ids, tables and allocator slack (~40 MB measured, whatever the dimension), not by the
    raw vectors too. At 1536-d the raw vectors (123 MB) dwarf that slack, so the bound, index +
    0.6x the raw vectors, holds with ~35 MB to spare and one more copy breaks it by ~90 MB."""
    n, dim = 20_000, 1536
    _store(tmp_path / "big", n, dim)
    _store(tmp_path / "small", 50, dim)
    raw = n * dim * 4
    index = next((tmp_path / "big").glob("index-*.faiss")).stat().st_size
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "big"), str(tmp_path / "small"),
                           str(Path(__file__).parent)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew = json.loads(proc.stdout.strip().splitlines()[-1])
    assert grew["open"] < index + 0.6 * raw, (grew, index, raw)
    assert grew["served"] < index + 0.6 * raw, (grew, index, raw)
    # serving reads candidates' vectors from the index's copy, not the mapped file: 200 requests
    # of ~300 candidates touch most of its pages otherwise (RssFile +~1.0x the raw vectors)
    assert grew["served_file"] < 0.1 * raw, (grew, raw)


def test_serving_from_the_compressed_index_reads_no_float_copy(tmp_path):
    """hnsw-sq8 keeps 8-bit codes: the candidates' vectors are decoded from them (what its search
    scored), not read from the mapped file, which 200 requests would pull in (~1.0x the raw
    vectors of RssFile before); a click's step still uses the exact vector."""
    from engine import Config

    n, dim = 20_000, 384
    _store(tmp_path / "sq8", n, dim, "hnsw-sq8")
    _store(tmp_path / "small", 50, dim, "hnsw-sq8")
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tmp_path / "sq8"), str(tmp_path / "small"),
                           str(Path(__file__).parent)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    grew = json.loads(proc.stdout.strip().splitlines()[-1])
    assert grew["served_file"] < 0.1 * n * dim * 4, grew
    with Engine.open(tmp_path / "sq8") as eng:
        st = eng._core.state  # noqa: SLF001 - the ranker's two readings of the same rows
        assert st.index.kind == "hnsw-sq8" and Config.from_dict(eng.config.to_dict()).index == "hnsw-sq8"
        rows = np.arange(0, n, 97)
        raw = st.items.vector_rows(rows)
        decoded = st.ranker.space.scoring_vectors(rows)
        cos = (raw * decoded).sum(1) / np.linalg.norm(decoded, axis=1)
        assert decoded.shape == raw.shape and cos.min() > 0.999 and not np.array_equal(decoded, raw)
        np.testing.assert_array_equal(st.ranker.space.item_vectors(rows), raw)  # state changes: exact
        assert len(eng.recommend("u0", 10)) == 10


def _rss_file() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssFile:"))


def test_a_pass_over_every_row_does_not_leave_the_vectors_file_resident(tmp_path):
    """After a pass over all rows (what a trained store's open, a rebuild and fit do), the
    mapped file's pages leave the process (MADV_PAGEOUT); a row an upsert wrote keeps its new
    vector (a private page is never dropped)."""
    n, dim = 20_000, 768
    vecs = np.random.default_rng(3).standard_normal((n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with Engine.create(tmp_path / "s", Config(fsync=False), encoder=_Lookup(vecs)) as eng:
        eng.ingest([Item(f"i{j}", f"item {j}") for j in range(n)], progress=False)
    eng = Engine.open(tmp_path / "s", encoder=_Lookup(vecs))
    items = eng._core.state.items  # noqa: SLF001 - the mapped table itself
    new = np.zeros((1, dim), np.float32)
    new[0, 0] = 1.0
    items._set_vector(5, new[0])  # noqa: SLF001 - a copy-on-write write, as an upsert does
    f0 = _rss_file()
    total = float(items.vectors.sum())  # touch every page
    touched = _rss_file() - f0
    items.release_vector_pages()
    left = _rss_file() - f0
    assert touched > 0.8 * n * dim * 4, touched
    assert left < 0.1 * n * dim * 4, (touched, left)
    np.testing.assert_array_equal(items.vector_rows(np.array([5]))[0], new[0])
    assert float(items.vectors.sum()) == total  # every value as it was (re-read from the file)
    eng.close(save=False)

"""A crafted FAISS file, made checksum-consistent in the manifest, is refused or safely rebuilt.

FAISS allocates what a file's counts claim before reading the data (a 20 KB file claiming 4 GB of
vectors cost 4 GB of memory; larger claims kill the process). serving/faiss_file checks the layout
before FAISS reads a byte; State.vouch_for_index checks what was read against the store.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import FakeEncoder, small_catalog

from engine import Config, CorruptStoreError, Engine, Item

ROOT = Path(__file__).resolve().parent.parent


def make(path: Path, config: Config | None = None, n: int = 120, prefix: str = "m") -> Path:
    with Engine.create(path, config, encoder=FakeEncoder()) as eng:
        eng.add_items(small_catalog())
        eng.add_items([Item(f"{prefix}{i}", f"T{i}", f"{['space rocket', 'pasta oven', 'goal league'][i % 3]} "
                            f"story {i} {prefix}") for i in range(n)])
    return path


def index_file(path: Path) -> Path:
    return next(path.glob("index-*.faiss"))


def resign(path: Path) -> None:
    from engine.storage.store import StoreDir

    sd = StoreDir(path, read_only=True)
    manifest = sd.read_manifest()
    manifest["files"] = sd.describe([path / n for n in manifest["files"]])
    sd.write_manifest(manifest)


def patch_u64(p: Path, find: bytes, after: int, value: int) -> None:
    data = bytearray(p.read_bytes())
    at = data.find(find)
    assert at >= 0
    struct.pack_into("<Q", data, at + after, value)
    p.write_bytes(bytes(data))


OPEN_LIMITED = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[1])
    from engine import Engine, StoreError
    from conftest import FakeEncoder
    resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))  # a regression fails, not the host
    for store in sys.argv[2:]:
        try:
            Engine.open(store, encoder=FakeEncoder(), read_only=True).close()
            print("OPENED", store)
        except StoreError as exc:
            print("REFUSED", exc)
    # VmHWM, this process's own peak: ru_maxrss would count the parent's RSS at the fork (Linux
    # carries the old image's peak over an exec), a gigabyte or two inside the full suite
    peak_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print("maxrss_mb", peak_kb // 1024)
""")


def test_absurd_counts_are_refused_before_faiss_allocates(tmp_path):
    """A flat index claiming 512 GB of vectors and an IVF index claiming 10^9 lists (under FAISS's
    own 1 TiB limit), each with valid checksums: refused with the file named, in a child process
    whose address space is capped, using no more memory than a normal open."""
    flat = make(tmp_path / "flat")
    patch_u64(index_file(flat), b"IxFI", 37, 1 << 37)  # the vectors' float count
    ivf = make(tmp_path / "ivf", Config(index="ivf"))
    patch_u64(index_file(ivf), b"ilar", 4, 10**9)  # the inverted lists' count
    ivf2 = make(tmp_path / "ivf2", Config(index="ivf"))
    patch_u64(index_file(ivf2), b"IwFl", 37, 10**9)  # the header's count
    for store in (flat, ivf, ivf2):
        resign(store)
    out = subprocess.run([sys.executable, "-c", OPEN_LIMITED, str(ROOT / "tests"), str(flat), str(ivf), str(ivf2)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    refused = [ln for ln in lines if ln.startswith("REFUSED")]
    assert len(refused) == 3, out.stdout
    for line, store in zip(refused, (flat, ivf, ivf2)):
        assert index_file(store).name in line and "not a readable FAISS index" in line
    assert int(lines[-1].split()[1]) < 2000, lines[-1]


def test_an_index_of_a_kind_kindling_never_writes_is_refused(tmp_path):
    store = make(tmp_path / "s")
    d = faiss.read_index(str(index_file(store))).d
    other = faiss.IndexIDMap(faiss.IndexLSH(d, 16))
    other.add_with_ids(np.ones((2, d), np.float32), np.arange(2, dtype=np.int64))
    faiss.write_index(other, str(index_file(store)))
    resign(store)
    with pytest.raises(CorruptStoreError, match=r"index-\d+\.faiss: .*refused before FAISS read it"):
        Engine.open(store, encoder=FakeEncoder(), read_only=True)


def test_an_index_naming_rows_outside_the_table_is_refused(tmp_path):
    store = make(tmp_path / "s")
    idx = faiss.read_index(str(index_file(store)))
    ids = faiss.vector_to_array(idx.id_map)
    ids[0] = 10**12  # would size the row bitmaps by it
    faiss.copy_array_to_vector(ids, idx.id_map)
    faiss.write_index(idx, str(index_file(store)))
    resign(store)
    with pytest.raises(CorruptStoreError, match=r"index-\d+\.faiss: the index holds rows outside"):
        Engine.open(store, encoder=FakeEncoder(), read_only=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "hnsw-sq8"])
def test_another_stores_index_is_rebuilt_from_the_snapshot(tmp_path, caplog, kind):
    """Same width, same row count, other vectors (another store's file, checksums made
    consistent): structurally sound, so it is caught by the vector sample and rebuilt; the
    neighbours served are this store's."""
    mine = make(tmp_path / "mine", Config(index=kind))
    theirs = make(tmp_path / "theirs", Config(index=kind), prefix="zz")
    with Engine.open(mine, encoder=FakeEncoder(), read_only=True) as eng:
        want = [r.item_id for r in eng.similar_items("space-0", k=5)]
    shutil.copyfile(index_file(theirs), index_file(mine))
    resign(mine)
    with caplog.at_level(logging.WARNING, logger="engine.runtime.state"):
        with Engine.open(mine, encoder=FakeEncoder(), read_only=True) as eng:
            got = [r.item_id for r in eng.similar_items("space-0", k=5)]
    assert got[:3] == want[:3] and len(set(got) & set(want)) >= 4  # HNSW: a rebuild's graph differs
    assert not [i for i in got if i.startswith("zz")]
    assert any("rebuilding it from the snapshot" in r.getMessage() for r in caplog.records)


def test_a_genuine_index_is_loaded_not_rebuilt(tmp_path, caplog):
    store = make(tmp_path / "s", Config(index="hnsw"))
    with caplog.at_level(logging.WARNING, logger="engine.runtime.state"):
        Engine.open(store, encoder=FakeEncoder(), read_only=True).close()
    assert not [r for r in caplog.records if "rebuilding" in r.getMessage()]

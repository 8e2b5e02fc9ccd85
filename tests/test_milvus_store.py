"""A store with index_backend="milvus" (a real Milvus Lite file): serving, reopen, and recovery.

The event log is the truth: after a SIGKILL between a log append and the collection's update,
and after the collection is damaged while the store is closed, the reopened store and the
collection agree again (exactly the live rows, with the store's vectors).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("pymilvus")

from engine import Config, Engine, Event, Filter  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.serving.milvus import MilvusHome  # noqa: E402

from conftest import FakeEncoder, small_catalog  # noqa: E402

WORKER = Path(__file__).resolve().parent / "helpers" / "milvus_worker.py"
TIMEOUT = 60
MILVUS = Config(index_backend="milvus")


def make_store(path: Path, config: Config = MILVUS) -> Path:
    with Engine.create(path, config, encoder=FakeEncoder()) as eng:
        eng.add_items(small_catalog())
        eng.record("ann", "space-0", "click")
        eng.record("ann", "space-1", "click")
    return path


def agreement(eng: Engine) -> tuple[bool, list[int], list[int]]:
    """(collection agrees with the store, rows Milvus holds, live rows of the item table)."""
    st = eng._core.state
    live = st.items.live_rows()
    stored = st.index.stored_rows(len(st.items))
    ok = st.index.agrees_with(live, st.ranker.space.index_vectors(live), st.index.kind, len(st.items),
                              np.random.default_rng(0))
    return ok, stored.tolist(), live.tolist()


def ids(recs) -> list[str]:
    return [r.item_id for r in recs]


def test_milvus_store_serves_like_faiss_and_survives_reopen(tmp_path):
    faiss_store = make_store(tmp_path / "faiss", Config())
    store = make_store(tmp_path / "milvus")
    asks = [dict(user_id="ann", k=4), dict(user_id="bob", k=3, profile="pasta recipe oven"),
            dict(user_id="ann", k=3, filter=Filter(categories_any=["ball"]))]
    with Engine.open(faiss_store, encoder=FakeEncoder()) as ref:
        want = [ids(ref.recommend(**a)) for a in asks]
        want_similar = ids(ref.similar_items("food-0", k=3))
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        assert eng.stats()["index"]["backend"] == "milvus"
        assert [ids(eng.recommend(**a)) for a in asks] == want, "exact search: the same answers as FAISS"
        assert ids(eng.similar_items("food-0", k=3)) == want_similar
        assert len(want[2]) == 3 and all(i.startswith("ball") for i in want[2])
        eng.record("ann", "space-2", "click")
        eng.remove_items(["space-3"])
        eng.add_items([small_catalog()[4]], upsert=True)  # an upsert replaces the vector in place
        after = ids(eng.recommend("ann", k=5))
        assert not {"space-0", "space-1", "space-2", "space-3"} & set(after)
    manifest = json.loads((store / "manifest.json").read_text())
    assert manifest["milvus"]["collection"].startswith(manifest["milvus"]["prefix"])
    assert not list(store.glob("index-*.faiss")), "a Milvus store keeps no FAISS file"
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        assert ids(eng.recommend("ann", k=5)) == after
        ok, stored, live = agreement(eng)
        assert ok and stored == live and eng._core.milvus.collections() == [manifest["milvus"]["collection"]]
    with Engine.open(store, encoder=FakeEncoder(), read_only=True) as ro:  # exact FAISS of the snapshot
        assert ro.stats()["index"]["backend"] == "faiss"
        assert ids(ro.recommend("ann", k=5)) == after


def test_fit_moves_the_collection_to_the_new_space(tmp_path):
    store = make_store(tmp_path / "s")
    events = [Event(f"u{u}", it.item_id, "click", timestamp=1_700_000_000 + 10 * u + j)
              for u in range(12) for j, it in enumerate(small_catalog()[(u % 3) * 4:(u % 3) * 4 + 3])]
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        before = eng._core.state.index.collection
        eng.fit(events, progress=False)
        assert eng._core.state.index.collection != before
        assert agreement(eng)[0]
        assert eng._core.milvus.collections() == [eng._core.state.index.collection], "the old one is dropped at commit"


def _kill_on(mode: str, store: Path, marker: str) -> None:
    proc = subprocess.Popen([sys.executable, str(WORKER), mode, str(store)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        for line in proc.stdout:
            if marker in line:
                os.kill(proc.pid, signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()


@pytest.mark.parametrize("mode,marker", [("before-add", "between"), ("before-remove", "between"),
                                         ("after-add", "applied")])
def test_killed_between_log_and_collection_agree_again(tmp_path, mode, marker):
    store = make_store(tmp_path / "s")
    _kill_on(mode, store, marker)
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        ok, stored, live = agreement(eng)
        assert ok and stored == live
        if mode == "before-remove":
            assert "food-1" not in eng and "food-1" not in ids(eng.recommend("x", k=12, profile="soup recipe"))
        else:
            assert "space-new" in eng
            assert ids(eng.similar_items("space-0", k=12)).count("space-new") == 1


@pytest.mark.parametrize("damage", ["drop", "stray", "missing", "vector"])
def test_a_damaged_collection_is_rebuilt_from_the_store(tmp_path, damage):
    store = make_store(tmp_path / "s")
    name = json.loads((store / "manifest.json").read_text())["milvus"]["collection"]
    home = MilvusHome(str(store / "milvus.db"))
    try:
        home.client.load_collection(name)
        if damage == "drop":
            home.client.drop_collection(name)
        elif damage == "stray":
            home.client.insert(name, [{"id": 500, "vec": np.ones(65, np.float32) / np.sqrt(65)}])
        elif damage == "missing":
            home.client.delete(name, ids=[3])
        else:
            got = home.client.query(name, filter="id >= 0", output_fields=["id"], limit=100)
            ids_all = sorted(int(e["id"]) for e in got)
            home.client.upsert(name, [{"id": i, "vec": np.ones(65, np.float32) / np.sqrt(65)} for i in ids_all])
    finally:
        home.close()
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        ok, stored, live = agreement(eng)
        assert ok and stored == live == list(range(12))
        assert ids(eng.similar_items("space-0", k=3))[0].startswith("space")


def test_cli_init_with_milvus(tmp_path):
    runner = CliRunner()
    uri = tmp_path / "shared.db"
    r = runner.invoke(main, ["init", str(tmp_path / "a"), "--index-backend", "milvus", "--milvus-uri", str(uri)])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "a" / "manifest.json").read_text())["config"]
    assert cfg["index_backend"] == "milvus" and cfg["milvus_uri"] == str(uri)
    r = runner.invoke(main, ["init", str(tmp_path / "b"), "--index-backend", "milvus", "--milvus-uri", "x.txt"])
    assert r.exit_code == 2 and "ends in .db" in r.output and not (tmp_path / "b").exists()
    r = runner.invoke(main, ["init", str(tmp_path / "c"), "--milvus-uri", str(uri)])
    assert r.exit_code == 2 and "only used with --index-backend milvus" in r.output


@pytest.mark.parametrize("changes,rule", [
    (dict(index_backend="qdrant"), "index_backend must be one of faiss, milvus"),
    (dict(milvus_uri="x.db"), "only used with index_backend='milvus'"),
    (dict(index_backend="milvus", milvus_uri="data/file"), "ends in .db"),
    (dict(index_backend="milvus", index="ivf-pq"), "Milvus Lite does not build IVF_PQ"),
])
def test_config_rules(changes, rule):
    with pytest.raises(ValueError, match=rule):
        Config(**changes)
    Config(index_backend="milvus", index="ivf-pq", milvus_uri="http://localhost:19530")  # a server can

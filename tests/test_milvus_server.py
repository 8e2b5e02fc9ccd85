"""The Milvus backend against a real standalone Milvus server (`milvus_uri="http://..."`).

The server is the `milvus` package's (2.3.5: a Milvus standalone binary with its own etcd and
RocksMQ, started as a child process in a temporary folder, ~6-10 s here). The module SKIPS,
saying why, when the package is missing or the server does not start, so a machine without it
still passes. Covered: insert, filtered and excluded search, delete and upsert through a store;
the IVF_PQ kind Milvus Lite cannot build; a server restart in the middle of a stream of writes
(a write that meets the server down waits for it and nothing is lost); a server down for longer
than the retry window (StoreError, removed rows stay out of the results, reopen reconciles).
"""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pymilvus")

from engine import Config, Engine, Filter, Item  # noqa: E402
from engine.errors import StoreError  # noqa: E402
from engine.serving import milvus as milvus_mod  # noqa: E402
from engine.serving.milvus import MilvusHome, MilvusIndex  # noqa: E402

from conftest import FakeEncoder, small_catalog  # noqa: E402


class LocalMilvus:
    """A standalone server of the `milvus` package in `data_dir`, restartable on the same ports
    (a restart must keep the address the store's Config names)."""

    def __init__(self, data_dir: Path) -> None:
        from milvus import MilvusServer, MilvusServerConfig

        class _Config(MilvusServerConfig):
            # The package test-binds each port without SO_REUSEADDR, so a port the stopped
            # server left in TIME_WAIT looks taken and a restart would move to the next one.
            def try_bind_port(self, port):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", port))
                    sock.listen()
                    return sock
                except OSError:
                    sock.close()
                    return None

        self.server = MilvusServer(_Config(data_dir=str(data_dir)))
        self.uri = ""

    def start(self) -> None:
        self.server.start()
        if not self.uri:  # pin every port the first start found free
            cfg = self.server.config
            cfg.update(**{k: cfg.get(k) for k in self.server.config_keys if k.endswith("_port")})
            self.uri = f"http://127.0.0.1:{self.server.listen_port}"

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    try:
        import milvus  # noqa: F401
    except ImportError:
        pytest.skip("no Milvus server: the 'milvus' package is not installed (pip install milvus==2.3.5)")
    srv = LocalMilvus(tmp_path_factory.mktemp("milvus-server"))
    try:
        srv.start()
    except Exception as exc:  # the package raises RuntimeError, TimeoutError, OSError
        srv.stop()
        pytest.skip(f"no Milvus server: the 'milvus' package's server did not start ({exc!r})")
    yield srv
    srv.stop()


@pytest.fixture
def up(server):
    """The server, running (a test that stops it leaves it running again for the next)."""
    if not server.server.running:
        server.start()
    return server


def server_config(srv: LocalMilvus, **kw) -> Config:
    return Config(index_backend="milvus", milvus_uri=srv.uri, **kw)


def ids(recs) -> list[str]:
    return [r.item_id for r in recs]


def agrees(eng: Engine) -> tuple[bool, list[int], list[int]]:
    st = eng._core.state
    live = st.items.live_rows()
    ok = st.index.agrees_with(live, st.ranker.space.index_vectors(live), st.index.kind, len(st.items),
                              np.random.default_rng(0))
    return ok, st.index.stored_rows(len(st.items)).tolist(), live.tolist()


def new_item(n: int) -> Item:
    return Item(f"space-new{n}", f"Space New {n}", f"rocket orbit moon launch mission{n}", ("space",))


def test_store_on_a_server_serves_like_faiss(up, tmp_path):
    asks = [dict(user_id="ann", k=4), dict(user_id="ann", k=3, filter=Filter(categories_any=["ball"]))]
    stores = {}
    for name, cfg in (("faiss", Config()), ("server", server_config(up))):
        with Engine.create(tmp_path / name, cfg, encoder=FakeEncoder()) as eng:
            eng.add_items(small_catalog())
            eng.record("ann", "space-0", "click")
            eng.record("ann", "space-1", "click")
            stores[name] = ([ids(eng.recommend(**a)) for a in asks], ids(eng.similar_items("food-0", k=3)))
            if name == "server":
                assert eng.stats()["index"]["backend"] == "milvus"
                eng.remove_items(["space-3"])                   # a delete
                eng.add_items([new_item(1)])                    # an insert, searchable at once
                eng.add_items([small_catalog()[2]], upsert=True)
                after = ids(eng.recommend("ann", k=12))
                assert "space-3" not in after and "space-new1" in after
                assert agrees(eng)[0]
    assert stores["server"] == stores["faiss"], "exact search: the same answers as FAISS"
    assert len(stores["server"][0][1]) == 3 and all(i.startswith("ball") for i in stores["server"][0][1])
    with Engine.open(tmp_path / "server", encoder=FakeEncoder()) as eng:
        ok, stored, live = agrees(eng)
        assert ok and stored == live and ids(eng.recommend("ann", k=12)) == after
        eng._core.milvus.drop_all()


@pytest.mark.parametrize("kind", ["hnsw", "ivf-pq"])
def test_index_kinds_on_a_server(up, kind):
    """Inserted rows are searchable at once (the collection's consistency level is Strong), and the
    exclusions and the filter act inside the search; IVF_PQ builds on a server."""
    home = MilvusHome(up.uri)
    try:
        idx = MilvusIndex(home, 16, kind, nlist=8)
        x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        idx.build(np.arange(300), x)
        assert idx.client.describe_index(idx.collection, "vec")["index_type"] == milvus_mod.MILVUS_INDEX[kind]
        idx.add(np.array([300]), x[:1])
        rows, _ = idx.search(x[0], 2)
        assert sorted(rows.tolist()) == [0, 300]
        idx.remove([0, 300])
        allowed = np.zeros(301, bool)
        allowed[100:] = True
        rows, _ = idx.search(x[5], 10, exclude=np.array([150]), allowed=allowed)
        assert len(rows) == 10 and rows.min() >= 100 and 150 not in rows
        assert idx.stored_count() == 299 and idx.stored_rows(301).tolist() == list(range(1, 300))
    finally:
        home.drop_all()
        home.close()


def test_a_restart_mid_stream_loses_nothing(up, tmp_path):
    store = tmp_path / "s"
    eng = Engine.create(store, server_config(up), encoder=FakeEncoder())
    try:
        eng.add_items(small_catalog())
        eng.record("ann", "space-0", "click")
        up.stop()
        up.start()                                            # between two writes
        eng.add_items([new_item(1)])
        eng.remove_items(["food-1"])
        up.stop()                                             # and during one: it waits for the server
        threading.Timer(0.5, up.start).start()
        t = time.monotonic()
        eng.add_items([new_item(2)])
        eng.remove_items(["food-2"])
        waited = time.monotonic() - t
        got = ids(eng.recommend("bob", k=14, profile="rocket moon soup recipe"))
        assert {"space-new1", "space-new2"} <= set(got) and not {"food-1", "food-2"} & set(got)
        assert agrees(eng)[0]
    finally:
        eng.close()
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        ok, stored, live = agrees(eng)
        assert ok and stored == live and len(live) == 12, f"waited {waited:.1f} s"
        eng._core.milvus.drop_all()


def test_a_server_down_past_the_retry_window(up, tmp_path, monkeypatch):
    store = tmp_path / "s"
    eng = Engine.create(store, server_config(up), encoder=FakeEncoder())
    try:
        eng.add_items(small_catalog())
        monkeypatch.setattr(milvus_mod, "RETRY_S", 0.5)
        up.stop()
        with pytest.raises(StoreError, match="reconciled"):
            eng.remove_items(["space-1"])                     # logged; Milvus not told
        up.start()
        assert "space-1" not in ids(eng.similar_items("space-0", k=11)), "kept out until Milvus confirms"
        eng.add_items([new_item(1)])                          # the next write sends the delete
        assert agrees(eng)[0] and not eng._core.state.index._unconfirmed_deletes
    finally:
        eng.close()
    with Engine.open(store, encoder=FakeEncoder()) as eng:
        ok, stored, live = agrees(eng)
        assert ok and stored == live and "space-1" not in eng and "space-new1" in eng
        eng._core.milvus.drop_all()

"""Batch embedding on Ray Data (`RayEmbedder`, `kindling ingest --ray`) against a real local Ray.

One local Ray of 2 CPUs serves the whole module (starting one takes 10-20 s); the CLI runs in a
subprocess that joins it by address. The vectors come from the real model on both sides.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine import Config, Engine, InvalidInputError, ModelLoadError
from engine.errors import ClusterError
from engine.text.catalog import item_text, read_items

from conftest import ROOT

ray = pytest.importorskip("ray", reason="needs the scale extra (ray[data])")

from engine.text.ray_embedding import RayEmbedder  # noqa: E402

COSINE_MIN = 0.9999


def env() -> dict[str, str]:
    """The test's environment plus this worktree on the path, Ray's usage statistics off, and no
    token authentication (a cluster on the loopback for this module's drivers only)."""
    e = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [e.get("PYTHONPATH")])])
    return e


def kindling(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], capture_output=True, text=True,
                          env=env(), timeout=timeout, cwd=ROOT)


#: Seconds the head started by `ray start` gets to accept a driver.
RAY_HEAD_WAIT_S = 120
#: Seconds the head gets to stop its cluster before what is left of it is killed.
RAY_HEAD_GRACE_S = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory):
    """A local Ray with 2 CPUs, no dashboard, for every test here; its address for other drivers.

    The head runs in a process of its own (`ray start --head --block`), as a deployment's does,
    and this process joins it as a driver. Started inside the test process, after the suite's
    earlier tests, Ray's own start (`ray.init(address="local")`) timed out waiting for its
    raylet (a fixed 30 s) on every try in CI and on a loaded host here, while the same call in
    a fresh process took 4 s; a head of its own starts as in a fresh process.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = f"127.0.0.1:{free_port()}"
    log = (tmp_path_factory.mktemp("ray") / "head.log").open("w")
    head = subprocess.Popen([str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
                             f"--port={address.split(':')[1]}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                             "--include-dashboard=false",
                             "--disable-usage-stats"], stdout=log, stderr=subprocess.STDOUT, env=env(),
                            start_new_session=True)
    try:
        deadline = time.monotonic() + RAY_HEAD_WAIT_S
        while True:
            try:
                ray.init(address=address, log_to_driver=False)
                break
            except Exception as e:  # Ray raises ConnectionError or a bare Exception while the head starts
                ray.shutdown()
                if head.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    raise RuntimeError(f"the Ray head did not start: {e}; its log: "
                                       f"{Path(log.name).read_text()[-2000:]}") from e
                time.sleep(1.0)
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
        # --block: told to stop, the head stops its cluster, whose processes share its session;
        # what is left after a grace period (it gives its raylet 30 s) is killed
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=RAY_HEAD_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        log.close()


@pytest.fixture(scope="module")
def slice_items(ml_slice: Path):
    return read_items(ml_slice)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.model
def test_ray_vectors_match_the_local_encoder_row_by_row(local_ray, slice_items, real_encoder):
    texts = [item_text(i) for i in slice_items]
    # Small batches: ten blocks over two actors, so blocks come back out of order.
    vecs = RayEmbedder(workers=2, batch_size=32).embed(texts, progress=False)
    assert vecs.shape == (len(texts), 384) and vecs.dtype == np.float32
    cos = cosines(vecs, real_encoder.encode(texts))
    assert len(texts) == 300 and cos.min() >= COSINE_MIN, (cos.argmin(), cos.min())


@pytest.mark.model
def test_cli_ingest_on_ray_gives_the_local_store(local_ray, slice_items, real_encoder, tmp_path):
    """`kindling ingest STORE FILE --ray=ADDRESS` in a subprocess joins the module's Ray; the store
    it builds has the neighbours of one built with the local encoder."""
    items = slice_items[:40]
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({"item_id": i.item_id, "title": i.title, "text": i.text,
                                        "categories": list(i.categories)}) + "\n" for i in items),
                    encoding="utf-8")
    store = tmp_path / "ray-store"
    assert kindling("init", str(store)).returncode == 0
    res = kindling("ingest", str(store), str(path), f"--ray={local_ray}", "--ray-workers", "1",
                   "--ray-batch-size", "16", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == f"ingested 40 items into {store} (embedded on ray)"
    with Engine.create(tmp_path / "local-store", encoder=real_encoder) as local, \
            Engine.open(store, encoder=real_encoder, read_only=True) as on_ray:
        local.ingest(items, progress=False)
        assert on_ray.stats()["live_items"] == 40
        for item in items[:5]:
            a, b = on_ray.similar_items(item.item_id, k=5), local.similar_items(item.item_id, k=5)
            assert [r.item_id for r in a] == [r.item_id for r in b]
            assert np.allclose([r.score for r in a], [r.score for r in b], atol=1e-3)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("KINDLING_LONG", "") in ("", "0"),
                    reason="starts a second Ray (30-60 s); run with KINDLING_LONG=1 (make test-long)")
@pytest.mark.model
def test_cli_ingest_on_ray_without_an_address_starts_a_local_ray(slice_items, tmp_path):
    """`--ray` alone: the subprocess starts its own local Ray, embeds, and stops it again."""
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps({"item_id": i.item_id, "title": i.title}) + "\n"
                            for i in slice_items[:20]), encoding="utf-8")
    store = tmp_path / "store"
    assert kindling("init", str(store)).returncode == 0
    res = kindling("ingest", str(store), str(path), "--ray", "--quiet")
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == f"ingested 20 items into {store} (embedded on ray)"
    assert "Started a local Ray instance" not in res.stderr  # the CLI keeps Ray's INFO lines off


def test_bad_row_leaves_the_store_as_it_was(engine):
    before = engine.stats()
    bad = [{"item_id": "new-1", "title": "Fine"}, {"item_id": "new-2", "title": "   "}]
    with pytest.raises(InvalidInputError, match="row 2: title must be a non-empty string"):
        engine.ingest(bad, embedder=RayEmbedder())
    assert engine.stats() == before


class WideEmbedder:
    """A batch embedder that answers with vectors of the wrong width for the store."""

    def embed(self, texts, model_path, backend, progress):
        return np.ones((len(texts), 384), np.float32) / np.sqrt(384)


def test_vectors_that_do_not_fit_the_store_leave_it_as_it_was(engine):
    before = engine.stats()
    with pytest.raises(InvalidInputError, match="384-d vectors but this store holds 64-d"):
        engine.ingest([{"item_id": "new-1", "title": "Rocket moon"}], embedder=WideEmbedder())
    assert engine.stats() == before and "new-1" not in engine


class ZeroEmbedder:
    """A batch embedder that answers with all-zero vectors (no direction to index)."""

    def embed(self, texts, model_path, backend, progress):
        return np.zeros((len(texts), 64), np.float32)


def test_zero_vectors_from_an_embedder_are_refused(engine):
    before = engine.stats()
    with pytest.raises(InvalidInputError, match="vectors must not be all zeros"):
        engine.ingest([{"item_id": "new-1", "title": "Rocket moon"}], embedder=ZeroEmbedder())
    assert engine.stats() == before


def test_a_model_that_fails_on_a_worker_is_a_model_load_error_and_changes_nothing(
        local_ray, tmp_path, fake_encoder, catalog):
    """The store's model folder names custom code: the workers refuse to load it, the refusal comes
    back as a ModelLoadError, and the store on disk and in memory is as it was."""
    custom = tmp_path / "custom-code-model"
    custom.mkdir()
    (custom / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "evil.Model"}}))
    path = tmp_path / "store"
    with Engine.create(path, Config(model_path=str(custom)), encoder=fake_encoder) as eng:
        eng.add_items(catalog)
        eng.save()
        before = eng.stats()
        with pytest.raises(ModelLoadError, match="on a Ray worker: .*custom-code-model names custom code"):
            eng.ingest([{"item_id": "a", "title": "A film"}], embedder=RayEmbedder(workers=1))
        assert eng.stats() == before
    with Engine.open(path, encoder=fake_encoder, read_only=True) as eng:
        assert eng.stats()["live_items"] == len(catalog) and "a" not in eng


def test_a_pool_larger_than_the_cluster_is_refused(local_ray):
    with pytest.raises(ClusterError, match="the pool needs 3 CPUs .* but the Ray cluster has 2"):
        RayEmbedder(workers=3).embed(["a film"])


def test_bad_embedder_settings_are_refused():
    with pytest.raises(InvalidInputError, match="workers must be a positive int; got 0"):
        RayEmbedder(workers=0)
    with pytest.raises(InvalidInputError, match="batch_size must be a positive int"):
        RayEmbedder(batch_size=True)


def test_without_ray_the_cli_names_the_extra(tmp_path):
    """`ray` made unimportable in a fresh interpreter: `import engine` still works, and --ray
    says which extra to install; the store is untouched."""
    store = tmp_path / "store"
    assert kindling("init", str(store)).returncode == 0
    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"item_id": "a", "title": "A film"}) + "\n", encoding="utf-8")
    code = ("import sys; sys.modules['ray'] = None; import engine; from engine.cli import main; "
            "sys.argv[0] = 'kindling'; main()")
    res = subprocess.run([sys.executable, "-c", code, "ingest", str(store), str(items), "--ray"],
                         capture_output=True, text=True, env=env(), timeout=120, cwd=ROOT)
    assert res.returncode == 1, res.stderr
    assert "needs ray[data], part of the scale extra (pip install 'kindling[scale]')" in res.stderr
    assert "Traceback" not in res.stderr
    with Engine.open(store, read_only=True) as eng:
        assert eng.stats()["live_items"] == 0


def test_ray_options_need_ray(tmp_path):
    res = kindling("ingest", str(tmp_path / "s"), str(ROOT / "index_data" / "movielens-small"),
                   "--ray-workers", "4")
    assert res.returncode == 2 and "--ray-workers and --ray-batch-size go with --ray" in res.stderr

"""`kindling serve --workers N`: a writer and read replicas on one port, as one service.

Real `kindling serve --workers 2` processes over a store of the fake encoder's vectors, talked to
with httpx: both workers answer reads; a write that reaches the replica is forwarded to the writer
(never 403; the API key is the writer's) and the next read on that connection shows it; /metrics
covers both workers; a replica or the writer killed with SIGKILL is started again and nothing
acknowledged is lost; SIGTERM stops the replica, then the writer, which saves.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from click.testing import CliRunner  # noqa: E402

from engine import Engine  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.http.forward import carries_profile, is_write  # noqa: E402
from engine.http.metrics import label_workers, with_label, worker_gauges  # noqa: E402

from helpers.serving import ROOT, free_port  # noqa: E402

KEY = "workers-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
READY = "served by 2 workers"


class Cluster:
    """`kindling serve STORE --workers 2` in a subprocess, ready once it says all workers answer."""

    def __init__(self, store: Path, tmp: Path, key: bool = False) -> None:
        self.store, self.port, self.log_path = store, free_port(), tmp / "cluster.log"
        args = [sys.executable, "-m", "engine.cli", "serve", str(store), "--port", str(self.port), "--workers", "2"]
        if key:
            (tmp / "key").write_text(KEY + "\n")
            args += ["--api-key-file", str(tmp / "key")]
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.url = f"http://127.0.0.1:{self.port}"
        self.wait_for(lambda text: READY in text, "both workers up")

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_for(self, check, what: str, limit_s: float = 120.0) -> str:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"exited with {self.proc.returncode} before {what}:\n{self.output()}"
            text = self.output()
            if check(text):
                return text
            time.sleep(0.1)
        raise AssertionError(f"not {what} after {limit_s} s:\n{self.output()}")

    def pids(self) -> dict[int, int]:
        """The pid of each worker as the supervisor last reported it."""
        found: dict[int, int] = {}
        text = self.output()
        for worker, pid in re.findall(r"(\d) (?:writer|replica) pid (\d+)", text):
            found[int(worker)] = int(pid)
        for worker, pid in re.findall(r"worker (\d) \(\w+\) started again, pid (\d+)", text):
            found[int(worker)] = int(pid)
        return found

    @contextmanager
    def client_on(self, worker: str, tries: int = 200) -> Iterator[httpx.Client]:
        """A keep-alive client whose connection the kernel gave to `worker`."""
        for _ in range(tries):
            with httpx.Client(base_url=self.url, timeout=60) as client:
                resp = client.get("/healthz")
                if resp.status_code == 200 and resp.headers["x-kindling-worker"] == worker:
                    yield client
                    return
        raise AssertionError(f"no connection reached worker {worker} in {tries} tries")

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(120)
        self.log.close()
        return code


@pytest.fixture(scope="module")
def store_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import FakeEncoder, small_catalog

    path = tmp_path_factory.mktemp("workers-template") / "store"
    with Engine.create(path, encoder=FakeEncoder()) as eng:
        eng.add_items(small_catalog())
    return path


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, store_template: Path) -> Iterator[Cluster]:
    """One --workers 2 server with an API key, shared by the read, write and metrics tests."""
    import shutil

    tmp = tmp_path_factory.mktemp("workers")
    shutil.copytree(store_template, tmp / "store")
    srv = Cluster(tmp / "store", tmp, key=True)
    yield srv
    code = srv.stop()
    assert code == 0 and "Traceback" not in srv.output(), srv.output()


# ---- reads, writes, read-your-writes -----------------------------------------------------------
def test_both_workers_answer_reads(cluster):
    seen = set()
    for i in range(200):
        resp = httpx.post(f"{cluster.url}/recommend", json={"user_id": f"r{i}", "k": 3}, timeout=60)
        assert resp.status_code == 200 and len(resp.json()["items"]) == 3
        seen.add(resp.headers["x-kindling-worker"])
        if seen == {"0", "1"}:
            break
    assert seen == {"0", "1"}


def test_a_write_on_the_replica_is_forwarded_and_read_back_there(cluster):
    with cluster.client_on("1") as c:
        for n in range(5):
            resp = c.post("/events", headers=AUTH, json={"user_id": f"ryw-{n}", "item_id": "space-1"})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-kindling-worker"] == "0" and int(resp.headers["x-kindling-log-seq"]) > 0
            read = c.get(f"/users/ryw-{n}")  # the same connection: the replica, right away
            assert read.headers["x-kindling-worker"] == "1"
            assert read.status_code == 200 and read.json()["history"] == ["space-1"]


def test_every_write_route_works_through_the_replica_never_403(cluster):
    with cluster.client_on("1") as c:
        # (an id already held: the writer refuses it before it would embed with the fake model)
        added = c.post("/items", headers=AUTH, json={"items": [{"item_id": "space-0", "title": "Again"}]})
        assert added.status_code == 409 and "upsert" in added.json()["detail"], added.text
        assert added.headers["x-kindling-worker"] == "0"
        removed = c.delete("/items/food-3", headers=AUTH)
        assert removed.status_code == 200 and removed.headers["x-kindling-worker"] == "0", removed.text
        assert c.get("/items/food-3").status_code == 404  # the replica already shows the removal
        # a /recommend with a profile is a write (the profile is saved): the writer answers it
        profiled = c.post("/recommend", headers=AUTH, json={"user_id": "p", "k": 2, "profile": 123})
        assert profiled.status_code == 422 and profiled.headers["x-kindling-worker"] == "0"
        plain = c.post("/recommend", json={"user_id": "p", "k": 2})
        assert plain.status_code == 200 and plain.headers["x-kindling-worker"] == "1"
        for resp in (added, removed, profiled):
            assert resp.status_code != 403


def test_a_body_too_large_is_refused_on_the_replica(cluster):
    big = b'{"user_id": "' + b"x" * (4 * 1024 * 1024) + b'"}'
    with cluster.client_on("1") as c:
        declared = c.post("/events", headers=AUTH, content=big)

        def stream():
            yield big[:1024]
            yield big[1024:]
        streamed = c.post("/events", headers=AUTH, content=stream())  # no Content-Length: chunked
    for resp in (declared, streamed):
        assert resp.status_code == 413 and "at most" in resp.json()["detail"], resp.text


def test_the_api_key_is_the_writers_to_check(cluster):
    with cluster.client_on("1") as c:
        resp = c.post("/events", json={"user_id": "nokey", "item_id": "space-0"})
        assert resp.status_code == 401 and resp.headers["x-kindling-worker"] == "0"
        assert resp.headers["www-authenticate"] == "Bearer"
        assert c.get("/users/nokey").status_code == 404


def test_min_seq_reads_a_write_made_on_another_connection(cluster):
    for n in range(6):
        with httpx.Client(base_url=cluster.url, timeout=60) as w, httpx.Client(base_url=cluster.url, timeout=60) as r:
            resp = w.post("/events", headers=AUTH, json={"user_id": f"ms-{n}", "item_id": "ball-2"})
            seq = resp.headers["x-kindling-log-seq"]
            read = r.get(f"/users/ms-{n}", headers={"X-Kindling-Min-Seq": seq})
            assert read.status_code == 200 and read.json()["history"] == ["ball-2"], read.headers


def test_metrics_cover_both_workers(cluster):
    with cluster.client_on("1") as c:
        c.post("/recommend", json={"user_id": "m", "k": 2})
        c.post("/events", headers=AUTH, json={"user_id": "m", "item_id": "food-0"})
        text = c.get("/metrics").text
    for worker in ("0", "1"):
        assert re.search(rf'kindling_requests_total{{method="POST",route="/recommend",status="200",'
                         rf'worker="{worker}"}} \d+', text), text
        assert re.search(rf'kindling_request_duration_seconds_count{{method="POST",route="/recommend",'
                         rf'worker="{worker}"}} \d+', text)
        assert f'kindling_requests_in_flight_limit{{worker="{worker}"}} 16' in text
    assert re.search(r'kindling_requests_total\{method="POST",route="/events",status="200",worker="0"\}', text)
    assert 'kindling_worker_up{worker="0",role="writer"} 1' in text
    assert 'kindling_worker_up{worker="1",role="replica"} 1' in text
    assert re.search(r'kindling_replica_behind_seconds\{worker="1"\} [\d.]+', text)
    assert re.search(r'kindling_replica_behind_records\{worker="1",role="replica"\} \d+', text)
    assert text.count("# TYPE kindling_requests_total counter") == 1  # one family, every worker in it


# ---- failures ------------------------------------------------------------------------------
def traffic(url: str, tag: str, acked: list[tuple[str, str]], stop: threading.Event) -> None:
    """POST clicks (a new connection every few) until stopped; `acked` gets each answered 200."""
    n = 0
    while not stop.is_set():
        with httpx.Client(base_url=url, timeout=60) as c:
            for _ in range(5):
                user, n = f"{tag}-{n}", n + 1  # each user once: a click lost with its connection is not sent again
                try:
                    resp = c.post("/events", json={"user_id": user, "item_id": "space-2"})
                except httpx.TransportError:
                    break
                if resp.status_code == 200:
                    acked.append((user, "space-2"))
        time.sleep(0.01)


def test_killed_workers_are_restarted_and_lose_nothing_acknowledged(tmp_path, store_template):
    import shutil

    shutil.copytree(store_template, tmp_path / "store")
    srv = Cluster(tmp_path / "store", tmp_path)
    acked: list[tuple[str, str]] = []
    stop = threading.Event()
    threads = [threading.Thread(target=traffic, args=(srv.url, f"t{i}", acked, stop)) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for victim, restarted in ((1, "worker 1 (replica) started again"), (0, "worker 0 (writer) started again")):
            time.sleep(1.0)
            before = len(acked)
            os.kill(srv.pids()[victim], signal.SIGKILL)
            srv.wait_for(lambda text: restarted in text, f"worker {victim} restarted")
            deadline = time.monotonic() + 60
            while len(acked) < before + 20 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert len(acked) >= before + 20, srv.output()  # writes go on after the restart
        seen = set()
        for i in range(200):  # and both workers answer again
            seen.add(httpx.get(f"{srv.url}/healthz", timeout=60).headers["x-kindling-worker"])
            if seen == {"0", "1"}:
                break
        assert seen == {"0", "1"}
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert srv.output().count("exited with -9") == 2
    code = srv.stop()
    assert code == 0 and "Traceback" not in srv.output(), srv.output()
    with Engine.open(tmp_path / "store", read_only=True) as eng:
        for user, item in acked:
            assert eng.user_history(user) == [item], user


def test_sigterm_stops_the_replica_then_the_writer_which_saves(tmp_path, store_template):
    import shutil

    shutil.copytree(store_template, tmp_path / "store")
    srv = Cluster(tmp_path / "store", tmp_path)
    pids = srv.pids()
    for pid in pids.values():  # serving never needs torch, in a worker either
        maps = Path(f"/proc/{pid}/maps")
        assert not maps.exists() or "libtorch" not in maps.read_text()
    with srv.client_on("1") as c:
        assert c.post("/events", json={"user_id": "last", "item_id": "food-2"}).status_code == 200
    generation = httpx.get(f"{srv.url}/stats", timeout=60).json()["generation"]
    assert srv.stop(signal.SIGTERM) == 0
    text = srv.output()
    assert "Traceback" not in text, text
    finished = [int(p) for p in re.findall(r"Finished server process \[(\d+)\]", text)]
    assert finished == [pids[1], pids[0]], text  # the replica first, the writer last
    with Engine.open(tmp_path / "store", read_only=True) as eng:
        stats = eng.stats()
        assert eng.user_history("last") == ["food-2"]
    assert stats["generation"] == generation + 1 and stats["pending_log_records"] == 0  # closed with a save
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_taken_store_fails_to_start_cleanly(cluster):
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", str(cluster.store), "--port",
                          str(free_port()), "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert "lock" in out.stderr.lower() and "worker 0 (writer) exited with 1 while starting" in out.stderr


def test_a_taken_port_fails_to_start_cleanly(cluster, tmp_path):
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", str(cluster.store), "--port",
                          str(cluster.port), "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    assert f"cannot listen on 127.0.0.1:{cluster.port}" in out.stderr


# ---- the pieces, without servers -------------------------------------------------------------
def test_cli_options(small_store_path):
    result = CliRunner().invoke(main, ["serve", str(small_store_path), "--replica", "--workers", "2"])
    assert result.exit_code == 2 and "use one or the other" in result.output
    result = CliRunner().invoke(main, ["serve", str(small_store_path), "--workers", "0"])
    assert result.exit_code == 2 and "Invalid value for '--workers'" in result.output
    assert "--workers N" in CliRunner().invoke(main, ["serve", "--help"]).output


def test_which_requests_are_writes():
    assert is_write("POST", "/events") and is_write("POST", "/items") and is_write("DELETE", "/items/a/b")
    assert not is_write("POST", "/recommend") and not is_write("POST", "/recommend/batch")
    assert not is_write("GET", "/items/a") and not is_write("GET", "/users/u")
    assert carries_profile(b'{"user_id": "a", "profile": "space films"}')
    assert carries_profile(b'{"user_id": "a", "\\u0070rofile": "space"}')  # an escaped key is still the key
    assert not carries_profile(b'{"user_id": "a", "profile": null}')
    assert not carries_profile(b'{"user_id": "profile"}') and not carries_profile(b"not json profile")


def test_metrics_of_several_workers_become_one_text():
    one = ('# HELP kindling_x_seconds Time.\n# TYPE kindling_x_seconds histogram\n'
           'kindling_x_seconds_bucket{route="/items/{item_id:path}",le="0.1"} 2\n'
           'kindling_x_seconds_count{route="/items/{item_id:path}"} 2\n'
           '# HELP kindling_events Events.\n# TYPE kindling_events gauge\nkindling_events 5\n')
    two = one.replace(" 2\n", " 7\n").replace(" 5\n", " 6\n")
    lines = label_workers([("0", one), ("1", two)])
    assert lines == ["# HELP kindling_x_seconds Time.", "# TYPE kindling_x_seconds histogram",
                     'kindling_x_seconds_bucket{route="/items/{item_id:path}",le="0.1",worker="0"} 2',
                     'kindling_x_seconds_count{route="/items/{item_id:path}",worker="0"} 2',
                     'kindling_x_seconds_bucket{route="/items/{item_id:path}",le="0.1",worker="1"} 7',
                     'kindling_x_seconds_count{route="/items/{item_id:path}",worker="1"} 7',
                     "# HELP kindling_events Events.", "# TYPE kindling_events gauge",
                     'kindling_events{worker="0"} 5', 'kindling_events{worker="1"} 6']
    assert with_label("a{} 1", "worker", "2") == 'a{worker="2"} 1'
    gauges = worker_gauges([{"worker": 0, "role": "writer", "up": True, "restarts": 1, "log_position": 10},
                            {"worker": 1, "role": "replica", "up": True, "restarts": 0, "log_position": 7},
                            {"worker": 2, "role": "replica", "up": False}])
    assert 'kindling_worker_up{worker="2",role="replica"} 0' in gauges
    assert 'kindling_worker_restarts{worker="0",role="writer"} 1' in gauges
    assert 'kindling_replica_behind_records{worker="1",role="replica"} 3' in gauges
    assert not any('worker="2"' in g for g in gauges if "worker_up" not in g)


def test_log_position_of_the_writer_and_a_replica(small_store_path):
    with Engine.open(small_store_path) as writer:
        start = writer.log_position()
        writer.record("lp", "space-0")
        assert writer.log_position() > start
        with Engine.open(small_store_path, read_only=True, follow=True) as replica:
            deadline = time.monotonic() + 30
            while replica.log_position() < writer.log_position() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert replica.log_position() == writer.log_position()
            assert replica.user_history("lp") == ["space-0"]

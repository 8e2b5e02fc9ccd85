"""Load shedding (`create_app(max_queue=N)`, `kindling serve --max-queue N`): a real uvicorn process
over a real FAISS store (the fake encoder's vectors), talked to with httpx.

The server here wraps its engine so that `recommend` first waits for a gate file, then sleeps
`hold` seconds: a test fills the queue with requests it holds, and every request past the limit
must then be shed at once (503, `Retry-After`, JSON naming the rule) while /healthz and /metrics
are not; the held requests answer 200 once the gate opens. A shed write leaves the store as it was.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from click.testing import CliRunner  # noqa: E402

from engine import Engine  # noqa: E402
from engine.cli import main  # noqa: E402
from engine.http.app import create_app  # noqa: E402
from engine.http.middleware import MAX_QUEUE, RETRY_AFTER_S  # noqa: E402

from helpers.serving import ROOT, TIMEOUT, free_port, wait_ready  # noqa: E402

#: The server: `create_app` over the store, `recommend` (and `recommend_many`, which answers
#: concurrent /recommend calls together) held by a gate file, then `hold` seconds.
SCRIPT = """
import os, sys, time
import uvicorn
from engine import Engine
from engine.http.app import create_app

store, port, max_queue, gate, hold = sys.argv[1:]
engine = Engine.open(store)

class Held:
    def __getattr__(self, name):
        return getattr(engine, name)

    def hold(self):
        deadline = time.monotonic() + 60
        while gate != "-" and not os.path.exists(gate) and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(float(hold))

    def recommend(self, *args, **kwargs):
        self.hold()
        return engine.recommend(*args, **kwargs)

    def recommend_many(self, *args, **kwargs):  # the service's micro-batches
        self.hold()
        return engine.recommend_many(*args, **kwargs)

app = create_app(Held(), max_queue=int(max_queue), close_on_shutdown=True)
uvicorn.run(app, host="127.0.0.1", port=int(port), log_level="warning")
"""


class Process:
    """A server subprocess (`args` after the interpreter), ready once /healthz answers 200."""

    def __init__(self, args: list[str], log: Path) -> None:
        self.port = free_port()
        self.log_path, self.log = log, open(log, "ab")
        self.proc = subprocess.Popen([sys.executable, *args, *self.extra()], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = httpx.Client(base_url=self.url, timeout=TIMEOUT)
        wait_ready(self.proc, self.client, self.output)

    def extra(self) -> list[str]:
        return []

    def output(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")

    def metrics(self) -> str:
        resp = self.client.get("/metrics")
        assert resp.status_code == 200, resp.text
        return resp.text

    def stop(self) -> None:
        """SIGTERM, then wait; a second call does nothing."""
        if self.log.closed:
            return
        self.proc.terminate()
        self.proc.wait(60)
        self.client.close()
        self.log.close()
        assert "Traceback" not in self.log_path.read_text(errors="replace"), self.log_path.read_text()


class HeldServer(Process):
    """SCRIPT over `store`; `recommend` waits for `open_gate` (when `gated`), then `hold` seconds."""

    def __init__(self, store: Path, tmp: Path, max_queue: int, hold: float = 0.0, gated: bool = True) -> None:
        self.gate = tmp / "gate"
        self.settings = [str(max_queue), str(self.gate) if gated else "-", str(hold)]
        super().__init__(["-c", SCRIPT, str(store)], tmp / "server.log")

    def extra(self) -> list[str]:
        return [str(self.port), *self.settings]

    def open_gate(self) -> None:
        self.gate.touch()


def gauge(text: str, name: str) -> float:
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, name
    return float(found.group(1))


def shed_counts(text: str) -> dict[tuple[str, str], int]:
    """kindling_requests_shed_total by (method, route)."""
    pattern = r'^kindling_requests_shed_total\{method="([^"]+)",route="([^"]+)"\} (\d+)$'
    return {(m, r): int(n) for m, r, n in re.findall(pattern, text, re.M)}


def assert_shed(resp: httpx.Response, limit: int) -> None:
    assert resp.status_code == 503, (resp.status_code, resp.text)
    assert resp.headers["retry-after"] == str(RETRY_AFTER_S)
    assert resp.headers["content-type"] == "application/json"
    assert resp.json() == {"detail": f"the server is at its limit of {limit} requests at once "
                                     f"(kindling serve --max-queue); retry after {RETRY_AFTER_S} s"}


def post_together(url: str, n: int, body: dict | None = None) -> tuple[list[threading.Thread], list]:
    """`n` POST /recommend from `n` threads, released at once; the responses land in the list."""
    answers: list = []
    start = threading.Barrier(n)

    def one(i: int) -> None:
        with httpx.Client(base_url=url, timeout=TIMEOUT) as c:
            start.wait()
            answers.append(c.post("/recommend", json=body or {"user_id": f"held-{i}", "k": 3}))
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads, answers


def wait_in_flight(srv: Process, n: int) -> str:
    deadline = time.monotonic() + 60
    while (text := srv.metrics()) and gauge(text, "kindling_requests_in_flight") != n:
        assert time.monotonic() < deadline, text
        time.sleep(0.02)
    return text


@pytest.fixture
def held(small_store_path: Path, tmp_path: Path) -> Iterator[HeldServer]:
    srv = HeldServer(small_store_path, tmp_path, max_queue=4)
    yield srv
    srv.open_gate()
    srv.stop()


def test_past_the_limit_every_route_is_shed_at_once_but_health_and_metrics(held, small_store_path):
    c = held.client
    before = c.get("/stats").json()
    threads, answers = post_together(held.url, 4)
    text = wait_in_flight(held, 4)
    assert gauge(text, "kindling_requests_in_flight_limit") == 4
    t = time.monotonic()
    shed = [c.post("/recommend", json={"user_id": "late", "k": 3}),
            c.post("/events", json={"user_id": "shed-user", "item_id": "space-0"}),
            c.post("/items", json={"items": [{"item_id": "shed-item", "title": "Never added"}]}),
            c.delete("/items/food-1"),
            c.get("/items/space-0/similar", params={"k": 2}),
            c.get("/users/shed-user"),
            c.get("/no-such-route")]
    assert time.monotonic() - t < 10  # answered without waiting for the held ones (which wait up to 60 s)
    for resp in shed:
        assert_shed(resp, 4)
    assert c.get("/healthz").status_code == 200  # never shed: a full server is still alive
    text = held.metrics()
    assert shed_counts(text) == {("POST", "/recommend"): 1, ("POST", "/events"): 1, ("POST", "/items"): 1,
                                 ("DELETE", "/items/{item_id:path}"): 1,
                                 ("GET", "/items/{item_id:path}/similar"): 1, ("GET", "/users/{user_id:path}"): 1,
                                 ("GET", "(unmatched)"): 1}
    assert 'kindling_requests_total{method="POST",route="/events",status="503"} 1' in text
    assert gauge(text, "kindling_requests_in_flight") == 4
    assert not answers  # the held requests are still held

    held.open_gate()
    for th in threads:
        th.join(60)
    assert sorted(a.status_code for a in answers) == [200] * 4
    assert all(len(a.json()["items"]) == 3 for a in answers)
    assert gauge(held.metrics(), "kindling_requests_in_flight") == 0

    # the shed writes did nothing: same counts, no such user, the item still there, no new item
    after = c.get("/stats").json()
    assert {k: after[k] for k in ("events", "live_items", "users")} == \
           {k: before[k] for k in ("events", "live_items", "users")}
    assert c.get("/users/shed-user").status_code == 404
    assert c.get("/items/shed-item").status_code == 404
    assert c.get("/items/food-1").status_code == 200
    held.stop()
    with Engine.open(small_store_path, read_only=True) as eng:
        assert "shed-item" not in eng and "food-1" in eng
        assert eng.stats()["events"] == before["events"]


def test_under_the_limit_nothing_is_shed(held):
    threads, answers = post_together(held.url, 4)
    wait_in_flight(held, 4)  # the queue full to the limit, not past it
    held.open_gate()
    for th in threads:
        th.join(60)
    assert [a.status_code for a in answers] == [200] * 4
    assert shed_counts(held.metrics()) == {}


def test_many_concurrent_slow_requests_some_shed_the_rest_answered(small_store_path, tmp_path):
    srv = HeldServer(small_store_path, tmp_path, max_queue=3, hold=1.0, gated=False)
    try:
        threads, answers = post_together(srv.url, 16)
        for th in threads:
            th.join(120)
        codes = sorted(a.status_code for a in answers)
        assert set(codes) == {200, 503} and codes.count(200) >= 3, codes
        for a in answers:
            if a.status_code == 503:
                assert_shed(a, 3)
            else:
                assert len(a.json()["items"]) == 3
        text = srv.metrics()
        assert shed_counts(text) == {("POST", "/recommend"): codes.count(503)}
        assert gauge(text, "kindling_requests_in_flight") == 0
    finally:
        srv.stop()


def test_no_limit_sheds_nothing(small_store_path, tmp_path):
    srv = HeldServer(small_store_path, tmp_path, max_queue=0, hold=0.5, gated=False)
    try:
        threads, answers = post_together(srv.url, 12)
        for th in threads:
            th.join(120)
        assert [a.status_code for a in answers] == [200] * 12
        text = srv.metrics()
        assert shed_counts(text) == {} and gauge(text, "kindling_requests_in_flight_limit") == 0
    finally:
        srv.stop()


def test_kindling_serve_max_queue_reaches_the_server(small_store_path, tmp_path):
    class Cli(Process):
        def __init__(self, options: list[str], log: Path) -> None:
            self.options = options
            super().__init__(["-m", "engine.cli", "serve", str(small_store_path)], log)

        def extra(self) -> list[str]:
            return ["--port", str(self.port), *self.options]

    for options, limit in (([], MAX_QUEUE), (["--max-queue", "2"], 2), (["--max-queue", "0"], 0)):
        srv = Cli(options, tmp_path / f"serve-{limit}.log")
        try:
            assert gauge(srv.metrics(), "kindling_requests_in_flight_limit") == limit
        finally:
            srv.stop()


def test_max_queue_is_checked(small_store_path):
    result = CliRunner().invoke(main, ["serve", str(small_store_path), "--max-queue", "-1"])
    assert result.exit_code == 2 and "Invalid value for '--max-queue'" in result.output
    assert f"[default: {MAX_QUEUE}]" in " ".join(CliRunner().invoke(main, ["serve", "--help"]).output.split())


@pytest.mark.parametrize("bad", [-1, 1.5, True, "8"])
def test_create_app_refuses_a_bad_max_queue(engine, bad):
    with pytest.raises(ValueError, match="max_queue must be an integer >= 0"):
        create_app(engine, max_queue=bad)

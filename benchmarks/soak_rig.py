"""The soak's rig (benchmarks/soak.py): the processes it kills and restarts, and the clients.

Two HTTP clients POST /events, each from users of its own, one request at a time, and note what
each answer told them; a producer XADDs entries with an event_id to a Redis Stream.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "helpers")]

from engine import Engine, Item  # noqa: E402

PY = sys.executable
ITEMS = [f"i{n}" for n in range(60)]
T0 = 1_700_000_000
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_store(path: Path) -> None:
    from rel_fakes import FakeEncoder

    with Engine.create(path, encoder=FakeEncoder()) as eng:
        eng.add_items([Item(i, f"Item {i}", f"word{n % 7} thing{n % 11} topic{n}", (f"c{n % 3}",))
                       for n, i in enumerate(ITEMS)])


class Proc:
    """A restartable child: `args`, its output appended to `log`; ready when `ready()` says so."""

    def __init__(self, name: str, args: list[str], log: Path, ready, url: str = "") -> None:
        self.name, self.args, self.log, self.ready, self.url = name, args, log, ready, url
        self.proc: subprocess.Popen | None = None

    def start(self, limit_s: float = 60.0) -> float:
        t = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=ENV)
        while time.monotonic() - t < limit_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            if self.ready():
                return time.monotonic() - t
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} not ready after {limit_s}s: {self.tail()}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
        if self.proc is not None:
            self.proc.wait(60)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]


def http_ready(url: str):
    def ready() -> bool:
        try:
            return httpx.get(url + "/healthz", timeout=1.0).status_code == 200
        except httpx.TransportError:
            return False
    return ready


class Sent:
    """One HTTP client's events, in the order sent: (user, item, kind, t, outcome)."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, str, int, str]] = []


class Clients:
    """HTTP clients and the stream producer; `pause()` returns once none has a request in flight."""

    def __init__(self, url: str, redis, stream: str, n_http: int, seed: int) -> None:
        self.url, self.redis, self.stream = url, redis, stream
        self.go = threading.Event()
        self.idle = [threading.Event() for _ in range(n_http + 1)]
        self.stop = False
        self.sent = [Sent() for _ in range(n_http)]
        self.xadded: list[dict[str, str]] = []
        self.t = T0
        self.tlock = threading.Lock()
        self.rng = random.Random(seed)
        self.threads = [threading.Thread(target=self._http, args=(c,), daemon=True) for c in range(n_http)]
        self.threads.append(threading.Thread(target=self._producer, daemon=True))

    def _tick(self) -> int:
        with self.tlock:
            self.t += 1
            return self.t

    def _wait_go(self, n: int) -> bool:
        while not self.go.is_set():
            self.idle[n].set()
            self.go.wait(0.1)
            if self.stop:
                return False
        self.idle[n].clear()
        return not self.stop

    def _http(self, c: int) -> None:
        rng = random.Random(self.rng.random())
        client = httpx.Client(base_url=self.url, timeout=30.0)
        while self._wait_go(c):
            user, item = f"h{c}-{rng.randrange(24)}", rng.choice(ITEMS)
            kind, t = ("skip" if rng.random() < 0.15 else "click"), self._tick()
            try:
                r = client.post("/events", json={"user_id": user, "item_id": item, "event": kind, "timestamp": t})
                outcome = "acked" if r.status_code == 200 else f"refused {r.status_code}"
            except httpx.ConnectError:
                outcome = "unsent"  # nothing reached a server
            except httpx.TransportError:
                outcome = "doubt"  # sent; the server died before it answered
            self.sent[c].events.append((user, item, kind, t, outcome))
            if outcome != "acked":
                time.sleep(0.02)

    def _producer(self) -> None:
        n, rng = len(self.idle) - 1, random.Random(self.rng.random())
        while self._wait_go(n):
            batch = []
            for _ in range(rng.randrange(1, 20)):
                e = {"event_id": f"s{len(self.xadded) + len(batch)}", "user_id": f"s-{rng.randrange(48)}",
                     "item_id": rng.choice(ITEMS), "event": "skip" if rng.random() < 0.15 else "click",
                     "t": str(self._tick())}
                batch.append(e)
            pipe = self.redis.pipeline(transaction=False)
            for e in batch:
                pipe.xadd(self.stream, e)
            pipe.execute()
            self.xadded.extend(batch)
            time.sleep(rng.uniform(0.02, 0.18))

    def start(self) -> None:
        for th in self.threads:
            th.start()
        self.go.set()

    def pause(self) -> None:
        self.go.clear()
        for e in self.idle:
            e.wait(60)

    def resume(self) -> None:
        for e in self.idle:
            e.clear()
        self.go.set()

    def close(self) -> None:
        self.stop = True
        self.go.set()
        for th in self.threads:
            th.join(60)


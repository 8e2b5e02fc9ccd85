"""`kindling serve STORE --workers N`: one writer and N-1 read replicas serving one port.

Python's GIL holds one process to about one core, so more cores need more processes. A store has
one writer, so the supervisor here starts worker 0 as the writer (it takes the store's lock and
replays the log) and, once it answers, workers 1..N-1 as read replicas that follow its log
(worker.py; engine.replica). Writes that reach a replica are forwarded to the writer
(forward.py), so a client sees one service.

The supervisor holds the public address without listening on it (a socket bound once, so a second
server on the same port fails at once; it is then shared with SO_REUSEPORT) and one private unix
socket per worker, in a private temporary directory. Each worker is a real subprocess
(`python -m engine.http.worker`, its own interpreter): no fork of a process holding threads or a
loaded store.

- A worker that dies is started again (at once, or after 0.5 s doubling to 30 s while it keeps
  dying within 10 s of its start). Killing the writer loses nothing acknowledged: a write was
  answered only after its fsync, and the new writer replays the log. Writes that reach its
  private socket meanwhile wait in that socket's queue; reads go on at the replicas.
- SIGTERM or SIGINT stops the replicas first, then the writer, so that the writer's closing
  snapshot is the last word (every write forwarded by a replica has been answered by then). A
  second signal kills what is left (SIGKILL loses nothing acknowledged either).
- The workers run in their own session: a terminal's Ctrl-C reaches the supervisor only, which
  stops them in that order. If the supervisor dies, each worker sees its stdin close and stops.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ..errors import InvalidInputError, StoreError
from .worker import WorkerSpec

#: A worker that dies within this many seconds of its start waits longer before the next.
QUICK_DEATH_S = 10.0
FIRST_DELAY_S, MAX_DELAY_S = 0.5, 30.0
#: Seconds a replica has to stop on SIGTERM (uvicorn's own grace, then some) before SIGKILL.
REPLICA_STOP_S = 45.0
PROBE_TIMEOUT_S = 1.0
MAX_WORKERS = 64


@dataclass
class Slot:
    """One worker's place: its private socket and the process that holds it now."""

    index: int
    path: str
    sock: socket.socket
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restarts: int = 0
    quick_deaths: int = 0
    due_at: float = 0.0  # when a dead worker may be started again
    exit_codes: list[int] = field(default_factory=list)

    @property
    def role(self) -> str:
        return "writer" if self.index == 0 else "replica"


class Supervisor:
    """Start, watch and stop the workers of one `kindling serve --workers N`.

    Args:
        store: the store's directory.
        host, port: the one public address (port 0: any free port; see `port` once started).
        workers: processes in all, >= 2 (one writer, the rest replicas).
        app_options: create_app's options for every worker (api_key, max_queue, ...; JSON values).
        log_level: uvicorn's, in every worker.
    """

    def __init__(self, store: str | Path, host: str, port: int, workers: int,
                 app_options: dict[str, Any] | None = None, log_level: str = "info") -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or not 2 <= workers <= MAX_WORKERS:
            raise InvalidInputError(f"workers must be an integer from 2 to {MAX_WORKERS}; got {workers!r}")
        self.store, self.host, self.port, self.workers = str(Path(store).resolve()), host, port, workers
        self.app_options, self.log_level = dict(app_options or {}), log_level
        self._token = secrets.token_hex(16)
        self._stop = threading.Event()
        self._force = False
        self._slots: list[Slot] = []
        self._reserved: socket.socket | None = None
        self._dir: str | None = None

    # ---- the whole run -----------------------------------------------------------------------
    def run(self) -> None:
        """Serve until SIGTERM or SIGINT; return once every worker has stopped.

        Raises:
            StoreError: the port is taken, or a worker failed to start (its message is above),
                or the writer did not stop cleanly.
        """
        previous = self._catch_signals()
        try:
            self._open_sockets()
            self._start_all()
            while not self._stop.wait(0.1):
                self._watch()
        finally:
            try:
                self._stop_all()
            finally:
                self._close_sockets()
                for sig, handler in previous.items():
                    signal.signal(sig, handler)
        writer = self._slots[0].exit_codes[-1:] if self._slots else []
        if writer and writer[0] not in (0, -signal.SIGTERM):
            raise StoreError(f"the writer (worker 0) exited with {writer[0]} while stopping; its message is above")

    def _catch_signals(self) -> dict[int, Any]:
        def handle(sig: int, frame: Any) -> None:
            if self._stop.is_set():
                self._force = True
            self._stop.set()
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    # ---- sockets -----------------------------------------------------------------------------
    def _open_sockets(self) -> None:
        """Reserve the public address (bound, not listening) and make each worker's unix socket."""
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))  # without SO_REUSEPORT: fails if anything holds the port
        except OSError as exc:
            sock.close()
            raise StoreError(f"cannot listen on {self.host}:{self.port} ({exc.strerror or exc})") from exc
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # now let our workers join it
        self._reserved, self.port = sock, sock.getsockname()[1]
        self._dir = tempfile.mkdtemp(prefix="kindling-serve-")  # mode 0700: the sockets are ours alone
        for i in range(self.workers):
            path = os.path.join(self._dir, f"w{i}.sock")
            uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            uds.bind(path)
            uds.listen(256)
            self._slots.append(Slot(i, path, uds))

    def _close_sockets(self) -> None:
        for slot in self._slots:
            slot.sock.close()
        if self._reserved is not None:
            self._reserved.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)

    # ---- starting ----------------------------------------------------------------------------
    def _start_all(self) -> None:
        """The writer first, the replicas once it answers; each must answer before we go on."""
        self._spawn(self._slots[0])
        self._wait_ready(self._slots[0])
        for slot in self._slots[1:]:
            self._spawn(slot)
        for slot in self._slots[1:]:
            self._wait_ready(slot)
        pids = ", ".join(f"{s.index} {s.role} pid {s.proc.pid}" for s in self._slots if s.proc)
        self._say(f"http://{self.host}:{self.port} served by {self.workers} workers ({pids}); "
                  f"SIGTERM or Ctrl-C stops the replicas, then the writer")

    def _spawn(self, slot: Slot) -> None:
        spec = WorkerSpec(self.store, self.host, self.port, slot.index, tuple(s.path for s in self._slots),
                          slot.sock.fileno(), self._token, slot.restarts, self.log_level, self.app_options)
        root = str(Path(__file__).resolve().parents[2])  # the directory holding the engine package
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen([sys.executable, "-m", "engine.http.worker"], stdin=subprocess.PIPE,
                                pass_fds=[slot.sock.fileno()], start_new_session=True, env=env)
        assert proc.stdin is not None
        proc.stdin.write(spec.to_json())  # the API key goes through the pipe, never the command line
        proc.stdin.flush()
        slot.proc, slot.started_at = proc, time.monotonic()

    def _wait_ready(self, slot: Slot) -> None:
        """Until the worker answers /healthz on its private socket; raise if it exits first."""
        with httpx.Client(transport=httpx.HTTPTransport(uds=slot.path), base_url="http://kindling-worker",
                          timeout=PROBE_TIMEOUT_S) as client:
            while True:
                assert slot.proc is not None
                code = slot.proc.poll()
                if code is not None:
                    raise StoreError(f"worker {slot.index} ({slot.role}) exited with {code} while starting; "
                                     "its message is above")
                if self._stop.is_set():
                    return
                try:
                    if client.get("/healthz").status_code == 200:
                        return
                except httpx.HTTPError:
                    time.sleep(0.05)

    # ---- watching ----------------------------------------------------------------------------
    def _watch(self) -> None:
        """Start again every worker that died, with a growing delay while it keeps dying."""
        now = time.monotonic()
        for slot in self._slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                code = self._reap(slot)
                quick = now - slot.started_at < QUICK_DEATH_S
                slot.quick_deaths = slot.quick_deaths + 1 if quick else 0
                delay = 0.0 if not quick else min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (slot.quick_deaths - 1))
                slot.due_at = now + delay
                self._say(f"worker {slot.index} ({slot.role}) exited with {code}; starting it again"
                          + (f" in {delay:.1f} s" if delay else ""))
            if slot.proc is None and now >= slot.due_at:
                slot.restarts += 1
                self._spawn(slot)
                self._say(f"worker {slot.index} ({slot.role}) started again, pid {slot.proc.pid}")

    def _reap(self, slot: Slot) -> int:
        assert slot.proc is not None
        code = slot.proc.wait()
        if slot.proc.stdin is not None:
            slot.proc.stdin.close()
        slot.exit_codes.append(code)
        slot.proc = None
        return code

    # ---- stopping ----------------------------------------------------------------------------
    def _stop_all(self) -> None:
        """SIGTERM the replicas and wait for them, then the writer (no time limit: it is saving)."""
        replicas = [s for s in self._slots[1:] if s.proc is not None]
        for slot in replicas:
            self._signal(slot, signal.SIGTERM)
        deadline = time.monotonic() + REPLICA_STOP_S
        for slot in replicas:
            self._wait_stopped(slot, deadline)
        if self._slots and self._slots[0].proc is not None:
            self._signal(self._slots[0], signal.SIGTERM)
            self._wait_stopped(self._slots[0], None)

    def _wait_stopped(self, slot: Slot, deadline: float | None) -> None:
        while slot.proc is not None and slot.proc.poll() is None:
            if self._force or (deadline is not None and time.monotonic() > deadline):
                self._signal(slot, signal.SIGKILL)
            time.sleep(0.05)
        if slot.proc is not None:
            self._reap(slot)

    def _signal(self, slot: Slot, sig: int) -> None:
        try:
            if slot.proc is not None:
                slot.proc.send_signal(sig)
        except ProcessLookupError:
            pass

    def _say(self, line: str) -> None:
        sys.stderr.write(f"kindling serve: {line}\n")
        sys.stderr.flush()


__all__ = ["MAX_WORKERS", "Supervisor"]

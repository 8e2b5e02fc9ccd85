"""One process of `kindling serve --workers N`: `python -m engine.http.worker`, started by
workers.py, which writes its `WorkerSpec` as one JSON line to the process's stdin.

Worker 0 opens the store for writing (the one writer: it holds the store's lock and replays the
log); the others open it read-only and follow the writer's log (engine.replica). Each serves the
same app on two sockets: the public port, which every worker binds with SO_REUSEPORT (the kernel
spreads new connections over the workers listening there), bound only once the store is open, so
that no connection waits on a worker still loading; and the worker's private unix socket, bound by
the supervisor and inherited, where the replicas forward writes and /metrics gathers the workers'
reports. The supervisor keeps that socket open across a restart: what reaches it meanwhile waits
in its queue for the next process.

stdin stays open: its end (the supervisor gone, however it died) stops the worker as SIGTERM does.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

#: Seconds uvicorn waits for requests in flight on shutdown before it cancels them.
GRACEFUL_TIMEOUT_S = 30
#: uvicorn's default queue of connections not yet accepted.
BACKLOG = 2048


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells one worker.

    Args:
        store: the store's directory.
        host, port: the public address (every worker binds it with SO_REUSEPORT).
        index: 0 for the writer, 1.. for the replicas.
        sockets: every worker's private unix socket path, by index.
        private_fd: this worker's private socket, inherited, already listening.
        token: the secret the workers show each other (forward.py).
        restarts: how many processes held this index before this one.
        log_level: uvicorn's.
        app: create_app's options (api_key, max_queue, ...), as JSON allows.
    """

    store: str
    host: str
    port: int
    index: int
    sockets: tuple[str, ...]
    private_fd: int
    token: str
    restarts: int = 0
    log_level: str = "info"
    app: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return json.dumps({**self.__dict__, "sockets": list(self.sockets)}).encode() + b"\n"

    @classmethod
    def from_json(cls, line: bytes) -> "WorkerSpec":
        data = json.loads(line)
        return cls(**{**data, "sockets": tuple(data["sockets"])})


def listen_shared(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port) that other processes of this user may share (SO_REUSEPORT)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


def run_worker(spec: WorkerSpec) -> None:
    """Open the store (writer or replica), then serve it until SIGTERM or SIGINT."""
    import uvicorn

    from ..engine import Engine
    from .app import create_app
    from .forward import WRITER, WorkerLink

    writer = spec.index == WRITER
    eng = Engine.open(spec.store) if writer else Engine.open(spec.store, read_only=True, follow=True)
    try:
        link = WorkerLink(spec.index, spec.sockets, spec.token, spec.restarts)
        app = create_app(eng, close_on_shutdown=True, worker=link, **spec.app)
        private = socket.socket(fileno=spec.private_fd)
        public = listen_shared(spec.host, spec.port)
        config = uvicorn.Config(app, log_level=spec.log_level, workers=1, server_header=False,
                                timeout_graceful_shutdown=GRACEFUL_TIMEOUT_S)
        uvicorn.Server(config).run(sockets=[public, private])
    finally:
        eng.close()  # a no-op after the lifespan closed it; closes it when startup failed


def _read_spec() -> WorkerSpec:
    """The first line of stdin, read from the descriptor itself (no buffered reader: the thread
    that then waits on it would hold that reader's lock at the interpreter's exit)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 65536)
        if not chunk:
            raise SystemExit("engine.http.worker is started by `kindling serve --workers`, which writes "
                             "its settings to stdin")
        data += chunk
    return WorkerSpec.from_json(data)


def _stop_with_parent() -> None:
    """Block on stdin until the supervisor's end closes, then stop as on SIGTERM."""
    try:
        while os.read(0, 4096):
            pass
    finally:
        os.kill(os.getpid(), signal.SIGTERM)


def main() -> None:
    from ..errors import EngineError

    spec = _read_spec()
    threading.Thread(target=_stop_with_parent, name="kindling-parent-watch", daemon=True).start()
    try:
        run_worker(spec)
    except (EngineError, OSError) as exc:  # one line, as the CLI prints its errors
        where = f"{exc.filename}: " if isinstance(exc, OSError) and exc.filename else ""
        role = "writer" if spec.index == 0 else "replica"
        sys.stderr.write(f"Error: worker {spec.index} ({role}): {where}{exc}\n")
        sys.exit(1)


if __name__ == "__main__":
    main()


__all__ = ["WorkerSpec", "listen_shared", "run_worker"]

"""`serve`: open a store for writing and run the service on uvicorn until SIGTERM or SIGINT.

The process is the store's one writer (it holds the store's lock), or, with `replica=True`, one of
any number of read-only replicas beside it: it follows the writer's log (engine.replica), serves
the reading routes and answers every write with 403, naming the rule. On SIGTERM or SIGINT uvicorn
stops accepting connections, answers the requests in flight, and then the lifespan closes the
store with a snapshot. Every acknowledged write was in the fsynced log before it was answered,
so even a SIGKILL loses nothing acknowledged: the next open replays the log. Past `max_queue`
requests at once, the next is answered 503 with `Retry-After` (middleware.py). With `workers`,
one writer and replicas serve the one port as one service (workers.py).
"""

from __future__ import annotations

from pathlib import Path

import uvicorn

from ..engine import Engine
from ..errors import InvalidInputError
from .app import create_app
from .batching import BATCH_WINDOW_S
from .middleware import MAX_QUEUE
from .worker import GRACEFUL_TIMEOUT_S



def read_api_key(path: Path) -> str:
    """The key in `path`: its content without surrounding whitespace, at least 16 characters."""
    key = path.read_text(encoding="utf-8").strip()
    if len(key) < 16 or any(c.isspace() for c in key):
        raise InvalidInputError(f"{path}: the API key must be at least 16 characters with no whitespace")
    return key


def serve(store: Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          log_level: str = "info", replica: bool = False, max_queue: int = MAX_QUEUE,
          batch_window_s: float = BATCH_WINDOW_S, workers: int = 1) -> None:
    """Serve `store` until a shutdown signal; the store is closed, with a snapshot, on the way out.

    With `replica`, the store is opened read-only and followed (no lock, no snapshot on the way out).
    `max_queue` bounds the requests admitted at once (create_app; 0: no limit); concurrent
    /recommend calls within `batch_window_s` go through one `recommend_many` (0: off).
    With `workers` > 1, that many processes serve the port: this one supervises a writer and
    workers - 1 replicas, which forward writes to it (workers.py); 1 is this process alone.
    """
    if workers != 1:
        if replica:
            raise InvalidInputError("replica serves one read-only process; workers > 1 starts its own "
                                    "writer and replicas: use one or the other")
        from .workers import Supervisor

        options = {"api_key": api_key, "max_queue": max_queue, "batch_window_s": batch_window_s}
        Supervisor(store, host, port, workers, options, log_level).run()
        return
    eng = Engine.open(store, read_only=True, follow=True) if replica else Engine.open(store)
    try:
        app = create_app(eng, api_key=api_key, close_on_shutdown=True, max_queue=max_queue,
                         batch_window_s=batch_window_s)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, workers=1,
                                timeout_graceful_shutdown=GRACEFUL_TIMEOUT_S, server_header=False)
        uvicorn.Server(config).run()
    finally:
        eng.close()  # a no-op after the lifespan closed it; closes it when startup failed


__all__ = ["GRACEFUL_TIMEOUT_S", "read_api_key", "serve"]

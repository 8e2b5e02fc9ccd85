"""`kindling consume`'s body: open the store, consume a Redis stream until told to stop, save.

Kept out of cli.py so that the CLI stays a parser and the loop is callable from Python too.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..engine import Engine
from ..errors import StoreError
from .core import Result, Summary, consume
from .redis_stream import RedisStreamSource, redis_client

log = logging.getLogger(__name__)


def run_redis_consumer(store: str | Path, url: str, stream: str, group: str, consumer: str | None = None,
                       dead_letter: str | None = None, batch: int = 500, until_idle: float | None = None,
                       claim_idle: float = 60.0, verbose: bool = False) -> Summary:
    """Consume `stream` into the store at `store` until SIGTERM/SIGINT or `until_idle` seconds idle.

    The store is opened for writing (the one writer) and closed with a snapshot at the end.

    Raises:
        StoreError: the store could not be opened or written; or Redis could not be reached
            (the message names the URL). What was not acknowledged is redelivered next time.
    """
    try:
        client = redis_client(url)
        client.ping()
    except ImportError as exc:
        raise StoreError(str(exc)) from exc
    except Exception as exc:
        if not _from_redis(exc):
            raise
        raise StoreError(f"cannot reach Redis at {url} ({exc})") from exc
    eng = Engine.open(store)
    stop = threading.Event()
    try:
        source = RedisStreamSource(client, stream, group, consumer, dead_letter, claim_idle)
        with _stop_on_signals(stop):
            summary = consume(eng, source, batch=batch, until_idle=until_idle, stop=stop,
                              on_batch=_progress if verbose else None)
    except Exception as exc:
        eng.close(save=False)  # the log holds every acknowledged event; a save could fail again
        if not _from_redis(exc):
            raise
        raise StoreError(f"Redis at {url} failed ({exc}); entries not acknowledged are delivered again "
                         "at the next start") from exc
    eng.close()
    return summary


def _from_redis(exc: Exception) -> bool:
    """redis-py's errors are not OSErrors: the CLI would print a traceback for them."""
    return type(exc).__module__.startswith("redis.")


def _progress(results: list[Result], summary: Summary) -> None:
    sys.stderr.write(f"batch {summary.batches}: {len(results)} acked; total {summary.applied} applied, "
                     f"{summary.duplicate} duplicate, {summary.dead} dead\n")
    sys.stderr.flush()


@contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGTERM and SIGINT set `stop` (the batch in hand finishes and is acknowledged) instead of
    raising in the middle of it; the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in previous:
        signal.signal(s, lambda signum, frame: stop.set())
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

"""A readers-writer lock: many concurrent searches, one mutation at a time, phase-fair.

Writers are preferred (a reader arriving while a writer waits queues behind it), but each
writer's release admits every reader that queued meanwhile before the next writer may enter. So a
steady stream of writes (every recorded event is one) cannot starve recommendations, and a steady
stream of reads cannot starve writes.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from collections.abc import Iterator


class RWLock:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._waiting_readers = 0
        self._admitted = 0  # readers let in by the last write release that have not entered yet
        self._releases = 0  # write releases so far: a queued reader waits for the next one
        self._owner: int | None = None

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:  # a writer may read its own state
            yield
            return
        with self._cond:
            if self._writer or self._waiting_writers:
                ticket = self._releases
                self._waiting_readers += 1
                while self._releases == ticket:
                    self._cond.wait()
                self._waiting_readers -= 1
                self._admitted -= 1
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:  # re-entrant for the writer
            yield
            return
        with self._cond:
            self._waiting_writers += 1
            while self._writer or self._readers or self._admitted:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer, self._owner = True, me
        try:
            yield
        finally:
            with self._cond:
                self._writer, self._owner = False, None
                self._admitted += self._waiting_readers
                self._releases += 1
                self._cond.notify_all()

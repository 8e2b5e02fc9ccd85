"""A readers-writer lock: many concurrent searches, one mutation at a time, writers preferred."""

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
        self._owner: int | None = None

    @contextmanager
    def read(self) -> Iterator[None]:
        me = threading.get_ident()
        if self._owner == me:  # a writer may read its own state
            yield
            return
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
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
            while self._writer or self._readers:
                self._cond.wait()
            self._waiting_writers -= 1
            self._writer, self._owner = True, me
        try:
            yield
        finally:
            with self._cond:
                self._writer, self._owner = False, None
                self._cond.notify_all()

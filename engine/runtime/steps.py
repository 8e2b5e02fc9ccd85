"""The online steps: a thread that takes the reranker's steps off the `record` path, and the step
itself, in two halves (its read under the read lock, its SGD after it).

`Engine.record` applies a click and returns once it is durable; the click's step waits in the
state's queue (runtime/state.py, "Deferred steps") until this thread, woken by the record, takes it
through `Steps.once` (one step: its read under the read lock). The worker holds no
state of its own: stopping it loses nothing, since a click whose step was never written is
stepped again after the store reopens.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ..storage.eventlog import EventLog
from ..storage.records import Record, to_payload
from .state import State

log = logging.getLogger(__name__)


class StepWorker:
    """Calls `step_once` (True while it found work) whenever woken, until it returns False."""

    def __init__(self, step_once: Callable[[], bool], name: str) -> None:
        self._step_once = step_once
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        """Finish the step in hand, then end the thread (the queue stays as it is)."""
        self._stopping = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                while not self._stopping and self._step_once():
                    pass
            except Exception:  # a step that fails leaves its click queued; the next wake retries
                log.exception("the online step failed")


class StepHost(Protocol):
    """What the steps need of the engine's core (runtime/core.py)."""

    state: State | None
    log: EventLog | None
    closed: bool
    dirty: bool

    @property
    def read_only(self) -> bool: ...

    def read(self, query: Callable[[bool], Any]) -> Any: ...


class Steps:
    """The waiting clicks' steps of one writable store: taken by the worker, `settle`, or first
    thing by a save, a fit and a close (`drain`)."""

    def __init__(self, host: StepHost, name: str) -> None:
        self._host, self._name = host, name
        self._mutex = threading.Lock()  # one online step at a time (the worker, `settle`)
        self._worker: StepWorker | None = None  # started by the first click that waits for a step
        self._lags: deque[float] = deque(maxlen=1024)  # seconds from a click to its step

    def once(self) -> bool:
        """The oldest waiting click's step: its read and log record (State.next_step) under the
        read lock (the write lock when a cache needs a rebuild first), its SGD (State.learn)
        after it, holding only the step mutex, which keeps steps in order and which a save or a
        fit takes before the state is written or replaced. False when none waits."""
        host = self._host
        if host.read_only:
            return False

        def read(refresh: bool) -> Any:
            self._mutex.acquire()  # the lock first, then the mutex: as `drain` under a save
            try:
                st, event_log = host.state, host.log
                if host.closed or st is None or event_log is None or not st.pending:
                    self._mutex.release()
                    return None
                return st, st.next_step(log_writer(event_log), refresh)
            except BaseException:
                self._mutex.release()
                raise

        got = host.read(read)
        if got is None:
            return False
        time.sleep(0)  # the GIL to a writer the read held up, before the SGD (else up to 5 ms later)
        try:
            self._learn(*got)
        finally:
            self._mutex.release()
        return True

    def _learn(self, st: State, step: tuple[Any, Any]) -> None:
        """A step's SGD, after its read (`once`, `drain`; the step mutex held)."""
        entry, plan = step
        st.learn(plan)
        self._lags.append(time.monotonic() - entry.queued)
        self._host.dirty = True

    def drain(self) -> None:
        """Every waiting step, now (the caller holds the write lock: a save, a fit, a close)."""
        with self._mutex:  # a step whose SGD runs now ends first
            st, event_log = self._host.state, self._host.log
            if st is None or event_log is None:
                return
            while st.pending:
                self._learn(st, st.next_step(log_writer(event_log), refresh=True))

    def wake(self) -> None:
        """Start (once) or wake the worker when clicks wait for their step."""
        host = self._host
        st = host.state
        if st is None or not st.pending or host.read_only or host.closed:
            return
        if self._worker is None:
            self._worker = StepWorker(self.once, self._name)
        self._worker.wake()

    def stop(self) -> None:
        if self._worker is not None:
            self._worker.stop()

    def report(self) -> dict[str, Any]:
        """Clicks waiting for their step, and the lag from click to step over the last (at most
        1,024) steps this process took (ms: p50, p99, max)."""
        st = self._host.state
        lags = np.array(list(self._lags), dtype=np.float64) * 1e3  # list(): one C-level copy
        out: dict[str, Any] = {"pending": 0 if st is None else len(st.pending), "lag_of_last": len(lags)}
        if len(lags):
            out.update(lag_ms_p50=round(float(np.percentile(lags, 50)), 3),
                       lag_ms_p99=round(float(np.percentile(lags, 99)), 3), lag_ms_max=round(float(lags.max()), 3))
        return out


def log_writer(event_log: EventLog) -> Callable[[Record], None]:
    """Appends a record to `event_log` without waiting for its fsync (a step record: see
    runtime/state.py, "Deferred steps")."""
    return lambda rec: event_log.write([to_payload(rec)])


__all__ = ["StepWorker", "Steps"]

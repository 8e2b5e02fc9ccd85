"""The step worker: a thread that takes the reranker's online steps off the `record` path.

`Engine.record` applies a click and returns once it is durable; the click's step waits in the
state's queue (state/apply.py, "Deferred steps") until this thread, woken by the record, takes it
through the callable it was given (`Engine`'s one step under the read lock). The worker holds no
state of its own: stopping it loses nothing, since a click whose step was never written is
stepped again after the store reopens.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

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

"""Read replicas: a read-only engine that applies the writer's new log records as they appear.

`Engine.open(path, read_only=True, follow=True)` starts a `Follower`, a daemon thread that polls
the current generation's event log (one `fstat` every `interval_s`) and applies each new
complete record, in order, through the same `State.apply` path recovery uses, under the
engine's write lock: a reader sees the state before a record or after it, never half of it.

What a follower must never do is what recovery does to a log's tail. A record the writer is
appending right now looks exactly like a torn record, so an incomplete tail means "not yet": it is
neither applied nor cut off (the follower holds no write lock and never writes), and the next
poll reads again from the same byte offset.

When the writer saves (`save`, `ingest`, `fit`: a new generation), `manifest.json` changes. The
follower drains what the old log still holds (through its open handle: the writer deletes the old
files, but an open file outlives its name). If the new generation is the next one and a plain
`save` (its manifest says `log_continues`: the snapshot is exactly the old one plus the records
this replica has just applied), the follower only moves on to the new log. Otherwise (an ingest
or a fit changes the state without log records; or generations were skipped) it loads the new
generation beside the one it serves (snapshot, then the new log's records) and swaps it in under
the write lock.

If the log shrinks below what was applied, or the record last applied is no longer where it
was (a writer that rolled back an append whose fsync failed), the follower resynchronises the
same way: a fresh load of the current generation. Real damage in the middle of the log is not
skipped: the follower keeps serving the last good state, reports the error in `lag()`, and
retries the load now and then (the writer's own reopen would refuse that log too).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from .errors import CorruptStoreError, InvalidInputError, StoreError
from .runtime.core import Core
from .storage.eventlog import HEADER, complete_records
from .storage.records import from_payload
from .storage.store import MANIFEST


log = logging.getLogger(__name__)

#: Default seconds between two polls of the log.
FOLLOW_INTERVAL_S = 0.01
#: Records applied per hold of the write lock, so that a long backlog does not stall readers.
APPLY_CHUNK = 256
#: Seconds between two attempts to reload after an error.
RETRY_S = 1.0


def check_interval(interval_s: float) -> float:
    if isinstance(interval_s, bool) or not isinstance(interval_s, (int, float)) or not 0.001 <= interval_s <= 10:
        raise InvalidInputError(f"follow_interval_s must be a number of seconds between 0.001 and 10; "
                                f"got {interval_s!r}")
    return float(interval_s)


class Follower:
    """The thread that keeps one read-only engine (its Core) up to date with the writer's log."""

    def __init__(self, core: Core, interval_s: float = FOLLOW_INTERVAL_S) -> None:
        self._core = core
        self.interval_s = check_interval(interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fh: BinaryIO | None = None   # the current generation's log, held open
        self._log_name: str | None = None
        self._offset = 0                    # bytes of the log applied (or skipped as already held)
        self._last: tuple[int, bytes] | None = None  # (offset, header) of the last record consumed
        self._next_seq = 0                  # the sequence number of the record at the offset
        self._manifest_sig: tuple[int, int, int] | None = None  # None: the first poll checks
        self._caught_up_at = time.time()
        self._last_poll_at = 0.0
        self._applied = 0
        self._reloads = 0
        self._continued = 0  # new generations entered without a reload (plain saves)
        self._error: str | None = None
        self._error_at = 0.0

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        """Attach to the log of the generation the engine loaded, then poll in the background."""
        self._attach(self._core)
        self._thread = threading.Thread(target=self._run, name=f"kindling-follow {self._core.path.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        self._close_log()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception as exc:  # keep serving the last good state; say why in lag()
                self._fail(f"{type(exc).__name__}: {exc}")

    def _fail(self, why: str) -> None:
        if why != self._error:
            log.warning("%s: replica stopped advancing: %s", self._core.path, why)
        self._error, self._error_at = why, time.time()

    # ---- what /stats shows -----------------------------------------------------------------
    def lag(self) -> dict[str, Any]:
        """Where the replica stands.

        `behind_s` is the time since a poll last found every complete record of the log applied
        (about `interval_s` while it keeps up; it grows while it falls behind or stalls).
        """
        now = time.time()
        return {"following": self._thread is not None, "generation": self._core.generation,
                "applied_seq": self._core.replayed_seq - 1, "behind_s": round(max(0.0, now - self._caught_up_at), 4),
                "last_poll_at": self._last_poll_at, "applied_records": self._applied,
                "reloads": self._reloads, "saves_continued": self._continued, "error": self._error, "interval_s": self.interval_s}

    # ---- one poll --------------------------------------------------------------------------
    def poll(self) -> int:
        """Apply what the writer appended since the last poll; reload on a new generation.

        Returns:
            The number of records applied (a reload counts none).
        """
        self._last_poll_at = time.time()
        if self._error is not None:  # a failed poll or reload: start over from the manifest
            if time.time() - self._error_at < RETRY_S:
                return 0
            self._manifest_sig = self._manifest_stat()
            self._reload()
            return 0
        sig = self._manifest_stat()
        if sig != self._manifest_sig:
            gen = self._core.store.manifest_generation()
            if gen is not None and gen != self._core.generation:
                n = self._drain()  # every record of the old log, all written before the save
                self._manifest_sig = sig
                self._next_generation()
                return n
            if gen is not None:
                self._manifest_sig = sig
        return self._drain()

    def _drain(self) -> int:
        """Apply the complete records of the held log past the offset; resync if it was rewritten."""
        if self._fh is None:
            n = self._attach(self._core)  # the log did not exist when last looked for
            if self._fh is None:
                self._caught_up_at = time.time()
            return n
        fd = self._fh.fileno()
        size = os.fstat(fd).st_size
        if size < self._offset or (self._last is not None
                                   and os.pread(fd, HEADER.size, self._last[0]) != self._last[1]):
            log.info("%s: the log was rewritten under the replica; reloading", self._core.path)
            self._reload()
            return 0
        if size == self._offset:
            self._caught_up_at = time.time()
            return 0
        return self._consume(self._core, os.pread(fd, size - self._offset, self._offset), locked=True)

    def _consume(self, core: Core, data: bytes, locked: bool) -> int:
        """Apply to `core` the complete records at the start of `data`, read at `self._offset`.

        Records the core already holds (seq below its next one) are only stepped over. With
        `locked`, each chunk is applied under the core's write lock (it is being served).
        """
        base = self._offset
        records, problem = complete_records(data, self._next_seq)
        todo = []
        for seq, end, payload in records:
            if seq >= core.replayed_seq:
                todo.append((seq, end, payload))
            else:
                self._advance(data, base, end, len(payload))
        for start in range(0, len(todo), APPLY_CHUNK):
            decoded = [(seq, end, len(p), json.loads(p.decode("utf-8"))) for seq, end, p in
                       todo[start:start + APPLY_CHUNK]]
            if locked:
                with core.lock.write():
                    self._apply_chunk(core, data, base, decoded)
            else:
                self._apply_chunk(core, data, base, decoded)
        self._applied += len(todo)
        if problem is not None:
            raise CorruptStoreError(f"{self._core.path / str(self._log_name)}: {problem} "
                                    f"(reading from byte {base}); the replica keeps the state before it")
        if self._offset - base == len(data):
            self._caught_up_at = time.time()
        return len(todo)

    def _apply_chunk(self, core: Core, data: bytes, base: int, decoded: list[tuple[int, int, int, Any]]) -> None:
        where = self._core.path / str(self._log_name)
        for seq, end, length, payload in decoded:
            core.apply(from_payload(payload, core.dim, f"{where}, record {seq}"))
            core.replayed_seq = seq + 1
            self._advance(data, base, end, length)

    def _advance(self, data: bytes, base: int, end: int, length: int) -> None:
        """Mark the record ending at `end` of `data` (read at `base`) as consumed."""
        start = end - HEADER.size - length
        self._last = (base + start, data[start:start + HEADER.size])
        self._next_seq = HEADER.unpack_from(data, start)[2] + 1
        self._offset = base + end

    # ---- generations -----------------------------------------------------------------------
    def _attach(self, core: Core) -> int:
        """Hold the log of the generation `core` holds and apply what `core` lacks of it.

        Returns:
            The number of records applied (0 when the log does not exist yet).
        """
        self._close_log()
        name = core.manifest.get("log")
        if not isinstance(name, str):
            return 0
        try:
            fd = os.open(self._core.path / name, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise StoreError(f"{self._core.path / name}: cannot be read ({exc.strerror or exc})") from exc
        self._fh, self._log_name = os.fdopen(fd, "rb"), name
        self._offset, self._last = 0, None
        self._next_seq = int(core.manifest.get("next_seq", 0))
        size = os.fstat(fd).st_size
        return self._consume(core, os.pread(fd, size, 0), locked=core is self._core) if size else 0

    def _close_log(self) -> None:
        if self._fh is not None:
            self._fh.close()
        self._fh, self._log_name, self._last = None, None, None

    def _next_generation(self) -> None:
        """Go on to the generation the manifest names now: straight to its log when it is the next
        one and a plain save of exactly what this replica holds, else by a reload."""
        live = self._core
        manifest = live.store.read_manifest()
        if not (manifest.get("log_continues") is True and int(manifest["generation"]) == live.generation + 1
                and int(manifest["next_seq"]) == live.replayed_seq and live.state is not None):
            self._reload()
            return
        with live.lock.write():
            live.continue_to(manifest)
        self._attach(live)
        self._continued += 1

    def _reload(self) -> None:
        """Load the generation the manifest names now, beside the served one, then swap it in."""
        live = self._core
        try:
            fresh = Core.load(live.store, live.encoders.current)  # snapshot + the log as it is now
            self._attach(fresh)  # and what was appended since, read through the held log
        except BaseException:
            self._close_log()  # the offsets are no one's now: the next try starts over
            raise
        with live.lock.write():
            live.swap_in(fresh)
        self._reloads += 1
        self._error = None
        self._caught_up_at = time.time()
        log.info("%s: replica now on generation %d (seq %d)", live.path, live.generation, live.replayed_seq)

    def _manifest_stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(Path(self._core.path) / MANIFEST)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)


__all__ = ["FOLLOW_INTERVAL_S", "Follower", "check_interval"]

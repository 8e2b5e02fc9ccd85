"""Append-only write-ahead log: one CRC-checked record per mutation, with a sequence number.

Record layout (little endian): u32 payload length, u32 CRC-32 of (seq bytes + payload), u64 seq,
then the payload (UTF-8 JSON). A record is acknowledged only after it was written and, when
`fsync` is on, fsynced; a failing write or fsync raises and the caller acknowledges nothing.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CorruptStoreError, InvalidInputError, StoreError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIQ")
MAX_RECORD = 64 * 1024 * 1024


class TornTailWarning(UserWarning):
    """The log ended in a partial record (a crash mid-append); it was dropped."""


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<Q", seq))) & 0xFFFFFFFF


def read_log(path: str | Path, repair: bool = False, first_seq: int | None = None,
             data: bytes | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (seq, record) in order.

    A damaged record counts as a torn tail (dropped with a TornTailWarning, and cut off the file
    when `repair`) only when it could be the one append a crash interrupted: no intact record
    follows it, and its header is incomplete, or its length runs to or past the end of the file, or
    only zero bytes follow it. Any other damage raises CorruptStoreError giving the byte offset, and
    so does a gap in the sequence numbers (which run on from `first_seq` when it is given).
    `data`, when given, is the file's content as already read (through a pinned handle).
    """
    p = Path(path)
    if p.is_symlink():
        raise CorruptStoreError(f"{p}: the event log must be a regular file, not a symbolic link")
    if data is None:
        if not p.exists():
            return
        data = p.read_bytes()
    off, end, expect = 0, len(data), first_seq
    while off < end:
        problem = _record_problem(data, off)
        if problem is not None:
            if _could_be_torn_tail(data, off, expect):
                yield from _torn(p, off, end, repair)
                return
            raise CorruptStoreError(f"{p}: {problem} in the record at byte offset {off}")
        length, _, seq = HEADER.unpack_from(data, off)
        if expect is not None and seq != expect:
            raise CorruptStoreError(f"{p}: the record at byte offset {off} has sequence number {seq} "
                                    f"where {expect} was expected (a lost or foreign record)")
        stop = off + HEADER.size + length
        try:
            record = json.loads(data[off + HEADER.size: stop].decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptStoreError(f"{p}: unreadable record at byte offset {off}") from exc
        yield seq, record
        off, expect = stop, seq + 1


def _record_problem(data: bytes, off: int) -> str | None:
    """What is wrong with the record starting at `off`, or None when it is intact."""
    if len(data) - off < HEADER.size:
        return "a truncated header"
    length, crc, seq = HEADER.unpack_from(data, off)
    stop = off + HEADER.size + length
    if length > MAX_RECORD:
        return f"an impossible length ({length:,} bytes)"
    if stop > len(data):
        return f"a length ({length:,} bytes) running past the end of the file"
    if _crc(seq, data[off + HEADER.size: stop]) != crc:
        return "a checksum mismatch"
    return None


def _could_be_torn_tail(data: bytes, off: int, expect: int | None) -> bool:
    """True when the damaged record at `off` may be the last append, cut short by a crash.

    An interrupted append leaves a prefix of a good record, so a complete header must carry a
    sane length and the expected sequence number; a zero-filled tail (the size grew, the data
    never arrived) is torn too.
    """
    if len(data) - off < HEADER.size or not data[off:].strip(b"\0"):
        return True
    length, _, seq = HEADER.unpack_from(data, off)
    if length > MAX_RECORD or (expect is not None and seq != expect):
        return False
    if _intact_record_after(data, off, seq if expect is None else expect):
        return False  # acknowledged records follow: this is damage, not an interrupted append
    stop = off + HEADER.size + length
    return stop >= len(data) or not data[stop:].strip(b"\0")


def _intact_record_after(data: bytes, off: int, expect: int) -> bool:
    """Is there an intact record with one of the next few sequence numbers after offset `off`?"""
    for seq in range(expect, expect + 8):
        needle = struct.pack("<Q", seq)
        pos = data.find(needle, off + 9)  # a header's seq field sits 8 bytes into it
        while pos != -1:
            if _record_problem(data, pos - 8) is None:
                return True
            pos = data.find(needle, pos + 1)
    return False


def _torn(path: Path, off: int, end: int, repair: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    warnings.warn(f"{path}: dropped a partial record at the end of the log "
                  f"(byte offset {off}, {end - off} bytes)", TornTailWarning, stacklevel=3)
    if repair:
        with open(path, "r+b") as fh:
            fh.truncate(off)
            os.fsync(fh.fileno())
    return iter(())


class LogSyncError(StoreError):
    """An fsync of the log failed: the records written since the last good one are not durable.

    The log refuses writes until `EventLog.rewind` cuts them off (the engine does that and reloads
    its state from the disk, so memory never holds what the disk does not)."""


class EventLog:
    """The open, append-only log file of the current store generation.

    Group commit: `write` puts a record in the file (the caller serialises writes) and returns a
    ticket; `sync(ticket)` returns once the record is fsynced. Callers wait for their fsync
    outside their own lock, so one fsync covers every record written while the previous one ran:
    concurrent writers share fsyncs, and nothing is acknowledged before its own fsync.
    `append` is `write` then `sync`.
    """

    def __init__(self, path: str | Path, next_seq: int, fsync: bool = True) -> None:
        self.path = Path(path)
        self.next_seq = next_seq
        self.fsync = fsync
        self._broken: str | None = None  # why appends are refused (a failed append left a tail)
        self._failed: str | None = None  # a failed fsync, until rewind() cuts what it did not cover
        self._fh = self._open()
        self._cv = threading.Condition()
        self._end = self._fh.tell()  # the byte offset after the last record written
        self._synced = (next_seq - 1, self._end)  # the last record known durable, and its end
        self._syncing = False
        self._epoch = 0  # bumped by rewind(): tickets of cut records never read as durable

    def _open(self):
        """Open for appending; never through a symbolic link (it could point at someone's file)."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot open the event log ({exc.strerror or exc}); "
                             "it must be a regular file") from exc
        return os.fdopen(fd, "ab")

    def append(self, record: dict[str, Any]) -> int:
        """Write one record durably and return its sequence number."""
        ticket = self.write([record])
        self.sync(ticket)
        return ticket[1]

    def append_many(self, records: list[dict[str, Any]]) -> list[int]:
        """Write several records with one write and one fsync; return their sequence numbers.

        All or nothing for the caller: a failure cuts every one of them off and raises. A crash in
        the middle can leave a prefix of them on disk (replayed on open, never acknowledged): the
        callers that batch give each event an id, so a redelivered one is not applied twice.
        """
        if not records:
            return []
        ticket = self.write(records)
        self.sync(ticket)
        return list(range(ticket[1] - len(records) + 1, ticket[1] + 1))

    def write(self, records: list[dict[str, Any]]) -> tuple[int, int]:
        """Put records in the file with one write (not yet fsynced); returns the ticket for `sync`
        (the last record's). The caller serialises writes.

        Raises:
            StoreError: the write failed (what it left was cut off: the log stays well-formed),
                or the log refuses writes (closed, broken, or a failed fsync not yet rewound).
        """
        if self._broken or self._failed or self._fh.closed:
            why = self._broken or self._failed or "the log is closed"
            raise StoreError(f"{self.path}: the event was not recorded ({why})")
        blobs, seq = [], self.next_seq
        for record in records:
            payload = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
            if len(payload) > MAX_RECORD:  # read_log would take it for corruption and refuse the store
                raise InvalidInputError(f"a log record may hold at most {MAX_RECORD:,} bytes; this one has "
                                        f"{len(payload):,} (add fewer items per call, or use ingest)")
            blobs.append(HEADER.pack(len(payload), _crc(seq, payload), seq) + payload)
            seq += 1
        start = self._fh.tell()
        try:
            self._fh.write(b"".join(blobs))
            self._fh.flush()
        except OSError as exc:
            self._rollback(start)
            raise StoreError(f"{self.path}: the event was not recorded ({exc.strerror or exc})") from exc
        with self._cv:
            self._end, self.next_seq = start + sum(map(len, blobs)), seq
            if not self.fsync:
                self._synced = (seq - 1, self._end)
        return self._epoch, seq - 1

    def sync(self, ticket: tuple[int, int]) -> None:
        """Return once the record of `ticket` (from `write`) is durable: fsynced, or written when
        fsync is off. One caller runs the fsync; the others wait for it and share it.

        Raises:
            LogSyncError: the fsync failed; the record is not known to be durable.
        """
        epoch, seq = ticket
        with self._cv:
            while True:
                if epoch != self._epoch:
                    raise LogSyncError(f"{self.path}: the record was cut off after a failed fsync")
                if self._synced[0] >= seq:
                    return
                if self._failed:
                    raise LogSyncError(f"{self.path}: {self._failed}")
                if not self._syncing:
                    break
                self._cv.wait()
            self._syncing = True
            target = (self.next_seq - 1, self._end)
        error = None
        try:
            os.fsync(self._fh.fileno())
        except (OSError, ValueError) as exc:  # ValueError: the file was closed under us
            error = exc
        with self._cv:
            self._syncing = False
            if error is None:
                self._synced = max(self._synced, target)
            else:
                self._failed = f"fsync failed ({getattr(error, 'strerror', None) or error})"
            self._cv.notify_all()
        if error is not None:
            raise LogSyncError(f"{self.path}: {self._failed}") from error

    def sync_all(self) -> None:
        """Make every record written so far durable (before a snapshot or close)."""
        self.sync((self._epoch, self.next_seq - 1))

    def rewind(self) -> bool:
        """After a failed fsync: cut every record after the last durable one off the file and take
        writes again. The caller holds the lock its writers take. False when there was nothing to do."""
        with self._cv:
            while self._syncing:
                self._cv.wait()
            if not self._failed:
                return False
            seq, end = self._synced
            self._rollback(end)
            self._end, self.next_seq, self._failed = end, seq + 1, None
            self._epoch += 1
            self._cv.notify_all()
        return True

    def _rollback(self, start: int) -> None:
        """Cut what a failed append may have left, so the log stays well-formed.

        If that fails too, later appends are refused until the store is reopened: a record written
        behind a partial one would make the log read as corrupt in the middle.
        """
        try:
            self._fh.close()  # may flush part of the failed record and raise again: cut below
        except OSError:
            pass
        try:
            fd = os.open(self.path, os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0))
            try:
                os.ftruncate(fd, start)
            finally:
                os.close(fd)
            self._fh = self._open()
        except (OSError, StoreError) as exc:
            self._broken = f"a failed append could not be rolled back ({exc}); reopen the store"
            log.warning("%s: %s", self.path, self._broken)

    def close(self) -> None:
        """Close the file; records written and not yet fsynced are fsynced first (a failed fsync
        is left to the waiters of those records to report)."""
        if self._fh.closed:
            return
        try:
            if not (self._failed or self._broken):
                self.sync_all()
        except LogSyncError:
            pass
        finally:
            with self._cv:
                while self._syncing:
                    self._cv.wait()
                self._fh.close()


def complete_records(data: bytes, expect: int) -> tuple[list[tuple[int, int, bytes]], str | None]:
    """The intact records at the start of `data`, whose first sequence number must be `expect`.

    Returns:
        ([(seq, end offset, payload), ...], problem): `problem` is None when the records run to
        the end of `data` or stop at what may be an append in progress (the same test recovery
        applies to a torn tail), else what is wrong and where.
    """
    out: list[tuple[int, int, bytes]] = []
    off = 0
    while off < len(data):
        problem = _record_problem(data, off)
        if problem is not None:
            if _could_be_torn_tail(data, off, expect):
                return out, None  # not yet: the writer is mid-append (or crashed there)
            return out, f"{problem} in the record at relative byte offset {off}"
        length, _, seq = HEADER.unpack_from(data, off)
        if seq != expect:
            return out, f"sequence number {seq} where {expect} was expected at relative byte offset {off}"
        stop = off + HEADER.size + length
        out.append((seq, stop, data[off + HEADER.size: stop]))
        off, expect = stop, seq + 1
    return out, None

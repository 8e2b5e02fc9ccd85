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
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import CorruptStoreError, StoreError

log = logging.getLogger(__name__)

HEADER = struct.Struct("<IIQ")
MAX_RECORD = 64 * 1024 * 1024


class TornTailWarning(UserWarning):
    """The log ended in a partial record (a crash mid-append); it was dropped."""


def _crc(seq: int, payload: bytes) -> int:
    return zlib.crc32(payload, zlib.crc32(struct.pack("<Q", seq))) & 0xFFFFFFFF


def read_log(path: str | Path, repair: bool = False) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (seq, record) in order.

    A partial or torn record at the very end is dropped with a TornTailWarning (and cut off the
    file when `repair`); a bad record followed by more data raises CorruptStoreError with its offset.
    """
    p = Path(path)
    if not p.exists():
        return
    data = p.read_bytes()
    off, end = 0, len(data)
    while off < end:
        if end - off < HEADER.size:
            yield from _torn(p, off, end, repair)
            return
        length, crc, seq = HEADER.unpack_from(data, off)
        stop = off + HEADER.size + length
        if length > MAX_RECORD or stop > end:
            if length > MAX_RECORD and stop <= end:
                raise CorruptStoreError(f"{p}: corrupt record at byte offset {off} (length {length})")
            yield from _torn(p, off, end, repair)
            return
        payload = data[off + HEADER.size: stop]
        if _crc(seq, payload) != crc:
            if stop == end:
                yield from _torn(p, off, end, repair)
                return
            raise CorruptStoreError(f"{p}: checksum mismatch in the record at byte offset {off}")
        try:
            record = json.loads(payload.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptStoreError(f"{p}: unreadable record at byte offset {off}") from exc
        yield seq, record
        off = stop


def _torn(path: Path, off: int, end: int, repair: bool) -> Iterator[tuple[int, dict[str, Any]]]:
    warnings.warn(f"{path}: dropped a partial record at the end of the log "
                  f"(byte offset {off}, {end - off} bytes)", TornTailWarning, stacklevel=3)
    if repair:
        with open(path, "r+b") as fh:
            fh.truncate(off)
            os.fsync(fh.fileno())
    return iter(())


class EventLog:
    """The open, append-only log file of the current store generation."""

    def __init__(self, path: str | Path, next_seq: int, fsync: bool = True) -> None:
        self.path = Path(path)
        self.next_seq = next_seq
        self.fsync = fsync
        self._fh = open(self.path, "ab")

    def append(self, record: dict[str, Any]) -> int:
        """Write one record durably and return its sequence number."""
        payload = json.dumps(record, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        seq = self.next_seq
        blob = HEADER.pack(len(payload), _crc(seq, payload), seq) + payload
        start = self._fh.tell()
        try:
            self._fh.write(blob)
            self._fh.flush()
            if self.fsync:
                os.fsync(self._fh.fileno())
        except OSError as exc:
            self._rollback(start)
            raise StoreError(f"{self.path}: the event was not recorded ({exc.strerror or exc})") from exc
        self.next_seq = seq + 1
        return seq

    def _rollback(self, start: int) -> None:
        """Best effort: cut what a failed append may have left, so the log stays well-formed."""
        try:
            self._fh.close()
            with open(self.path, "r+b") as fh:
                fh.truncate(start)
        except OSError:
            log.warning("could not trim %s after a failed append; the tail will be dropped on open",
                        self.path)
        self._fh = open(self.path, "ab")

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

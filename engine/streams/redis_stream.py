"""Redis Streams as a `Source`: a consumer group, redeliveries first, dead letters beside the stream.

Needs the `scale` extra (redis-py), imported when a source is made, never by `import engine`.

Reading order:
1. this consumer's own pending entries (delivered before, never acknowledged: the consumer was
   killed or its batch failed), read with XREADGROUP from id 0;
2. entries pending for longer than `claim_idle_s` at other consumers of the group (a consumer
   that died under another name), taken over with XAUTOCLAIM; again every `claim_idle_s`;
3. new entries (XREADGROUP `>`), blocking up to the time `consume` allows.

A group the source creates starts at the stream's first entry (XGROUP CREATE ... 0 MKSTREAM).
Settling a batch XADDs each dead message to the dead-letter stream (its original fields plus
`reason` and `source_id`), then XACKs the whole batch, in one pipeline. A crash between the two
can dead-letter a message twice; it never drops one.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidInputError
from .core import Message, Result

log = logging.getLogger(__name__)


def redis_client(url: str) -> Any:
    """A redis-py client for `url` (redis://HOST:PORT/DB, rediss://..., unix:///path/redis.sock)."""
    try:
        import redis
    except ImportError as exc:
        raise ImportError("reading a Redis stream needs redis-py: pip install 'kindling[scale]'") from exc
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise InvalidInputError(f"a Redis URL starts with redis://, rediss:// or unix://; got {url!r}")
    return redis.Redis.from_url(url)


class RedisStreamSource:
    """One consumer of a consumer group on one stream (see the module docstring for the order).

    Args:
        client: a redis-py client (bytes responses, the default).
        stream, group: the stream key and the consumer group (created when missing).
        consumer: this consumer's name in the group; keep it across restarts so that its own
            pending entries come back to it at once (default: kindling-HOSTNAME).
        dead_letter: the dead-letter stream (default: `<stream>:dead`).
        claim_idle_s: take over another consumer's entries pending longer than this.
    """

    def __init__(self, client: Any, stream: str, group: str, consumer: str | None = None,
                 dead_letter: str | None = None, claim_idle_s: float = 60.0) -> None:
        for name, value in (("stream", stream), ("group", group)):
            if not isinstance(value, str) or not value:
                raise InvalidInputError(f"{name} must be a non-empty string; got {value!r}")
        self.client, self.stream, self.group = client, stream, group
        self.consumer = consumer or f"kindling-{socket.gethostname()}"
        self.dead_letter = dead_letter or f"{stream}:dead"
        if self.dead_letter == stream:
            raise InvalidInputError("the dead-letter stream must differ from the stream it serves")
        self.claim_idle_s = claim_idle_s
        self._own_cursor: str | None = "0"   # next id of our own pending entries; None once read
        self._claim_cursor = "0-0"
        self._next_claim = 0.0              # monotonic time of the next XAUTOCLAIM sweep
        self.ensure_group()

    def ensure_group(self) -> bool:
        """Create the group at the stream's first entry (and the stream) unless it exists.

        Returns:
            True when it was created.
        """
        from redis.exceptions import ResponseError

        try:
            self.client.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
            return False
        log.info("created consumer group %r on %r at its first entry", self.group, self.stream)
        return True

    def read(self, count: int, block_s: float) -> list[Message]:
        """Own pending entries first, then idle ones claimed from others, then new ones."""
        if self._own_cursor is not None:
            got = self._read_group(self._own_cursor, count, None)
            if got:
                self._own_cursor = got[-1].id
                return got
            self._own_cursor = None
        if time.monotonic() >= self._next_claim:
            got = self._claim(count)
            if got:
                return got
        return self._read_group(">", count, max(0, int(block_s * 1000)) or None)

    def _read_group(self, start: str, count: int, block_ms: int | None) -> list[Message]:
        reply = self.client.xreadgroup(self.group, self.consumer, {self.stream: start}, count=count,
                                       block=block_ms)
        if isinstance(reply, dict):  # RESP3 clients answer a map
            reply = list(reply.items())
        out = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                out.append(Message(_text(entry_id), fields or {}))
        return out

    def _claim(self, count: int) -> list[Message]:
        """One XAUTOCLAIM step; the sweep restarts every claim_idle_s once it reaches the end."""
        reply = self.client.xautoclaim(self.stream, self.group, self.consumer,
                                       min_idle_time=int(self.claim_idle_s * 1000),
                                       start_id=self._claim_cursor, count=count)
        cursor, entries = _text(reply[0]), reply[1]
        self._claim_cursor = cursor
        if cursor == "0-0":
            self._next_claim = time.monotonic() + self.claim_idle_s
        out = [Message(_text(i), f or {}) for i, f in entries if i is not None]
        if out:
            log.info("took over %d entries idle for %.0f s at other consumers", len(out), self.claim_idle_s)
        return out

    def settle(self, results: Sequence[Result]) -> None:
        """XADD the dead ones to the dead-letter stream with their reason, then XACK all."""
        if not results:
            return
        pipe = self.client.pipeline(transaction=False)
        for r in results:
            if r.outcome == "dead":
                pipe.xadd(self.dead_letter, {**dict(r.message.fields), "reason": r.reason or "",
                                             "source_id": r.message.id})
        pipe.xack(self.stream, self.group, *[r.message.id for r in results])
        pipe.execute()


def _text(value: str | bytes) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value

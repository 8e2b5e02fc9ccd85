"""A stream consumer's core, whatever the broker: parse messages, apply them once, settle them.

A message is one event with string fields: `event_id`, `user_id`, `item_id`, `event` (click,
skip, impression or dislike), and optional `value` (a finite number, 1.0 by default), `t` (an
integer, unix seconds; the time of application by default) and `profile` (the user's profile
text). Other fields are ignored. `apply_messages` turns a batch of them into one
`Engine.record_many` call (one write-lock hold, one fsync); `consume` loops a `Source` through it
and settles each batch only after it is durable. A broker adapter (`redis_stream.py`, a Kafka one
later) implements `Source`: read a batch, and settle it (dead letters out, then acknowledge).

Delivery is at least once, application exactly once: the store keeps every applied `event_id`
(`Engine.record_many`), so whatever a broker redelivers after a crash is counted a duplicate.

Example:
    >>> results = apply_messages(engine, [Message("1-0", {"event_id": "e1", "user_id": "u",
    ...                                                    "item_id": "m1", "event": "click"})])
    ...                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Literal, Protocol

from ..engine import Engine
from ..errors import InvalidInputError
from ..text.catalog import check_text
from ..types import EVENT_KINDS, Event
from ..types import check_id

log = logging.getLogger(__name__)

REQUIRED = ("event_id", "user_id", "item_id", "event")
Outcome = Literal["applied", "duplicate", "dead"]


@dataclass(frozen=True)
class Message:
    """One entry as a source delivered it: its id in the source (what gets acknowledged) and its
    fields (names and values as str or bytes; empty for an entry the broker no longer holds)."""

    id: str
    fields: Mapping[str | bytes, str | bytes]


@dataclass(frozen=True)
class Result:
    """What became of a message: applied, a duplicate of an applied event_id, or dead (`reason`)."""

    message: Message
    outcome: Outcome
    reason: str | None = None


class Source(Protocol):
    """A broker as `consume` sees it."""

    def read(self, count: int, block_s: float) -> list[Message]:
        """Up to `count` messages, oldest first, redeliveries before new ones; wait at most
        `block_s` seconds for one when none is ready (0: do not wait)."""

    def settle(self, results: Sequence[Result]) -> None:
        """Send the dead ones to the dead-letter destination with their reason, then acknowledge
        every message of `results`. Called only once their events are durable in the store."""


def parse_message(fields: Mapping[str | bytes, str | bytes]) -> tuple[Event, str | None]:
    """The event (and profile text, or None) a message holds.

    Raises:
        InvalidInputError: the reason it cannot be applied: a missing field, bytes that are not
            UTF-8, an id, kind, value, time or profile that breaks the rule of `Engine.record`.
    """
    f = _decoded(fields)
    if not f:
        raise InvalidInputError("the message holds no fields (an entry deleted from the stream?)")
    missing = [k for k in REQUIRED if k not in f]
    if missing:
        raise InvalidInputError(f"missing field(s) {', '.join(missing)}; a message needs {', '.join(REQUIRED)}")
    for k in ("event_id", "user_id", "item_id"):
        check_id(f[k], k)
    if f["event"] not in EVENT_KINDS:
        raise InvalidInputError(f"event must be one of {', '.join(EVENT_KINDS)}; got {f['event']!r}")
    value = _number(f.get("value", "1"), float, "value must be a finite number")
    if not math.isfinite(value):
        raise InvalidInputError(f"value must be a finite number; got {f['value']!r}")
    t = None if "t" not in f else _number(f["t"], int, "t must be an integer (unix seconds)")
    profile = f.get("profile")
    if profile is not None:
        check_text(profile, "profile")
    return Event(f["user_id"], f["item_id"], f["event"], value, t, f["event_id"]), profile


def _decoded(fields: Mapping[str | bytes, str | bytes]) -> dict[str, str]:
    out = {}
    for k, v in fields.items():
        try:
            key = k.decode("utf-8") if isinstance(k, bytes) else k
            out[key] = v.decode("utf-8") if isinstance(v, bytes) else v
        except UnicodeDecodeError:
            raise InvalidInputError(f"field {k!r} is not valid UTF-8") from None
    return out


def _number(text: str, kind: type, rule: str) -> float | int:
    try:
        return kind(text)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{rule}; got {text!r}") from None


def apply_messages(engine: Engine, messages: Sequence[Message]) -> list[Result]:
    """Validate, deduplicate by event_id and apply a batch: one `Engine.record_many` call.

    Durable when this returns. A message that cannot be applied is a "dead" Result with its
    reason (the batch goes on without it); one whose event_id the store holds is a "duplicate".

    Raises:
        StoreError: the store could not record the batch (a full disk, say); nothing of it is
            applied, and nothing may be acknowledged.
    """
    parsed: list[tuple[Message, Event, str | None]] = []
    dead: dict[int, str] = {}
    for n, msg in enumerate(messages):
        try:
            parsed.append((msg, *parse_message(msg.fields)))
        except InvalidInputError as exc:
            dead[n] = str(exc)
    outcomes = iter(engine.record_many([e for _, e, _ in parsed], [p for _, _, p in parsed]) if parsed else [])
    results = []
    for n, msg in enumerate(messages):
        if n in dead:
            results.append(Result(msg, "dead", dead[n]))
            continue
        outcome = next(outcomes)
        if outcome == "unknown_item":
            item = _decoded(msg.fields)["item_id"]
            results.append(Result(msg, "dead", f"unknown item id {item!r} (never added, or removed)"))
        else:
            results.append(Result(msg, outcome))
    return results


@dataclass
class Summary:
    """Counts of one `consume` run."""

    applied: int = 0
    duplicate: int = 0
    dead: int = 0
    batches: int = 0
    seconds: float = 0.0
    stopped_by: str = ""

    def add(self, results: Sequence[Result]) -> None:
        self.batches += 1
        for r in results:
            setattr(self, r.outcome, getattr(self, r.outcome) + 1)

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def consume(engine: Engine, source: Source, batch: int = 500, until_idle: float | None = None,
            stop: threading.Event | None = None, save_every: int = 100_000,
            on_batch: Callable[[list[Result], Summary], None] | None = None) -> Summary:
    """Read, apply and settle batches from `source` until `stop` is set or it stays idle.

    Each batch is applied (durably) before it is settled, so a crash at any moment loses no
    message: what was not yet acknowledged is delivered again and deduplicated by event_id.

    Args:
        batch: most messages per batch (one write-lock hold and one fsync each).
        until_idle: return once no message has come for this many seconds (None: run on).
        stop: set it (from a signal handler, say) to return after the batch in hand.
        save_every: write a snapshot once this many records wait in the log, those an earlier
            (killed) consumer left counted too, so the log stays short however often it restarts.
        on_batch: called after each batch is settled, with its results and the running counts.
    """
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise InvalidInputError(f"batch must be a positive integer; got {batch!r}")
    stop = stop or threading.Event()
    summary, start = Summary(), time.monotonic()
    last, unsaved = start, engine.stats()["pending_log_records"]
    while not stop.is_set():
        wait = 1.0 if until_idle is None else max(0.0, min(1.0, until_idle - (time.monotonic() - last)))
        messages = source.read(batch, wait)
        if not messages:
            if until_idle is not None and time.monotonic() - last >= until_idle:
                summary.stopped_by = "idle"
                break
            continue
        results = apply_messages(engine, messages)
        source.settle(results)
        summary.add(results)
        last = time.monotonic()
        unsaved += sum(r.outcome == "applied" for r in results)
        if unsaved >= save_every:
            engine.save()
            unsaved = 0
        if on_batch is not None:
            on_batch(results, summary)
    summary.stopped_by = summary.stopped_by or "stop"
    summary.seconds = round(time.monotonic() - start, 3)
    return summary

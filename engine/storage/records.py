"""The event log's records: one frozen dataclass per kind of mutation, and their JSON payloads.

The payload keys are short because every recorded event is one record; they are the on-disk format
(`docs/architecture.md`), read back by `from_payload`, which refuses what it does not know.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from ..errors import CorruptStoreError, InvalidInputError
from ..types import EVENT_KINDS, Item, check_id


def b64(a: np.ndarray) -> str:
    """float32 array -> base64 text (vectors travel in the log so replay needs no model)."""
    return base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode("ascii")


def unb64(s: str, dim: int) -> np.ndarray:
    """`b64` back to shape (n, dim) float32."""
    return np.frombuffer(base64.b64decode(s), np.float32).reshape(-1, dim).copy()


@dataclass(frozen=True)
class AddRecord:
    """Items added (or replaced) at time `t`, with their text vectors, shape (n, dim) float32."""

    t: int
    items: tuple[Item, ...]
    vectors: np.ndarray


@dataclass(frozen=True)
class RemoveRecord:
    ids: tuple[str, ...]


def id_key(event_id: str) -> int:
    """A caller's event id as a 64-bit hash: what the store keeps to apply each id once.

    Two distinct ids collide with probability about n**2 / 2**65 among n ids (1e-6 at 6 million).
    """
    raw = event_id.encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"kindling-evid").digest(), "little")


@dataclass(frozen=True)
class EventRecord:
    """One click, skip, impression or dislike, as `Engine.record` took it.

    `event_id`, when the caller gave one (a stream consumer does), makes the event idempotent: the
    store applies an id once, whatever redelivers it (`Engine.record(..., event_id=)`).
    """

    user_id: str
    item_id: str
    event: str
    value: float
    t: int
    event_id: str | None = None

    def key(self) -> int:
        """The event's identity (user, item, kind, time) as a 64-bit hash: what makes an import
        idempotent. The value is not part of it: the same event reported twice is one event."""
        raw = "\0".join((self.user_id, self.item_id, self.event, str(self.t))).encode("utf-8", "surrogatepass")
        return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class ProfileRecord:
    """A user's profile text and its text vector, shape (dim,) float32."""

    user_id: str
    text: str
    vector: np.ndarray


@dataclass(frozen=True)
class ImportRecord:
    """Past events brought into the store (`Engine.import_events`), oldest first."""

    events: tuple[EventRecord, ...]


@dataclass(frozen=True)
class StepRecord:
    """The reranker's online step for the oldest click still waiting for one (`key`: that click's
    `EventRecord.key`), taken (`taken`) or found to teach nothing (the item was not among the
    user's candidates). Written where the step read the state, so a replay takes it at the same
    point of the history and reaches the same weights (runtime/state.py, "Deferred steps")."""

    key: int
    taken: bool


Record = Union[AddRecord, RemoveRecord, EventRecord, ProfileRecord, ImportRecord, StepRecord]


def _event_payload(r: EventRecord) -> list[Any]:
    return [r.user_id, r.item_id, r.event, r.value, r.t]


def _item_payload(item: Item) -> list[Any]:
    """[id, title, text, categories], and expires_at only when set (older stores' records)."""
    out = [item.item_id, item.title, item.text, list(item.categories)]
    return out if item.expires_at is None else [*out, item.expires_at]


def to_payload(rec: Record) -> dict[str, Any]:
    """The JSON object written to the log for `rec`."""
    if isinstance(rec, EventRecord):
        out = {"op": "event", "u": rec.user_id, "i": rec.item_id, "e": rec.event, "v": rec.value, "t": rec.t}
        return out if rec.event_id is None else {**out, "id": rec.event_id}  # older records: no "id"
    if isinstance(rec, AddRecord):
        return {"op": "add", "t": rec.t, "dim": int(rec.vectors.shape[1]), "vec": b64(rec.vectors),
                "items": [_item_payload(i) for i in rec.items]}
    if isinstance(rec, RemoveRecord):
        return {"op": "remove", "ids": list(rec.ids)}
    if isinstance(rec, ProfileRecord):
        return {"op": "profile", "u": rec.user_id, "text": rec.text, "vec": b64(rec.vector)}
    if isinstance(rec, ImportRecord):
        return {"op": "import", "events": [_event_payload(e) for e in rec.events]}
    if isinstance(rec, StepRecord):
        return {"op": "step", "k": rec.key, "s": int(rec.taken)}
    raise TypeError(f"not a log record: {type(rec).__name__}")


def from_payload(data: dict[str, Any], dim: int | None, where: str) -> Record:
    """The record a payload holds. `dim` is the store's text-vector width (None before any item).

    Raises:
        CorruptStoreError: an unknown `op` or a payload not shaped as `to_payload` writes it;
            the message names `where` (the log file and the record's sequence number).
    """
    op = data.get("op") if isinstance(data, dict) else None
    try:
        if op == "event":
            event_id = data.get("id")
            if event_id is not None and not isinstance(event_id, str):
                raise TypeError(f"event id {event_id!r} is not a string")
            return EventRecord(data["u"], data["i"], data["e"], float(data["v"]), int(data["t"]), event_id)
        if op == "add":
            items = tuple(Item(i, t, x, tuple(c), *rest) for i, t, x, c, *rest in data["items"])
            return AddRecord(int(data["t"]), items, unb64(data["vec"], int(data["dim"])))
        if op == "remove":
            return RemoveRecord(tuple(data["ids"]))
        if op == "profile":
            return ProfileRecord(data["u"], data["text"], unb64(data["vec"], int(dim or 0))[0])
        if op == "import":
            return ImportRecord(tuple(EventRecord(u, i, e, float(v), int(t)) for u, i, e, v, t in data["events"]))
        if op == "step":
            key, taken = data["k"], data["s"]
            if not (isinstance(key, int) and 0 <= key < 2**64 and taken in (0, 1)):
                raise ValueError(f"step key {key!r} or flag {taken!r} out of range")
            return StepRecord(key, bool(taken))
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CorruptStoreError(f"{where}: a malformed {op!r} record ({exc!r})") from exc
    raise CorruptStoreError(f"{where}: unknown record op {op!r}; this store was written by a newer "
                            "or a foreign program, and replaying past it would lose state")


def event_record(user_id: str, item_id: str, event: str, value: float, timestamp: int | None,
                  event_id: str | None = None) -> EventRecord:
    """An event checked against the rules of `record` (the message names the rule broken)."""
    check_id(user_id, "user_id")
    check_id(item_id, "item_id")
    if event_id is not None:
        check_id(event_id, "event_id")
    if event not in EVENT_KINDS:
        raise InvalidInputError(f"event must be one of {', '.join(EVENT_KINDS)}; got {event!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError(f"value must be a finite number; got {value!r}")
    if timestamp is not None and (isinstance(timestamp, bool) or not isinstance(timestamp, int)):
        raise InvalidInputError(f"timestamp must be an int (unix seconds); got {timestamp!r}")
    t = int(time.time()) if timestamp is None else timestamp
    return EventRecord(user_id, item_id, event, float(value), t, event_id)

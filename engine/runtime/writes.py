"""The writes of a store, once their arguments are checked (engine/engine.py): each takes the
core's write lock, checks what only the state can tell (a duplicate id, an unknown item), logs its
record and applies it. `record` and `record_many` wait for their fsync after the lock is released
(group commit) and then wake the step worker.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import DuplicateItemError, InvalidInputError, UnknownItemError
from ..storage.records import AddRecord, EventRecord, ImportRecord, ProfileRecord, RemoveRecord, event_record
from ..text.catalog import check_text, item_text
from ..text.embedding import BatchEmbedder, check_embedded, embed, embed_many, given_vectors
from ..types import Event, Item
from .core import Core
from .state import State

#: Events per import record: a record stays far below the log's 64 MiB cap, and a crash in the
#: middle of a long import leaves whole records that a second import completes.
IMPORT_CHUNK = 20_000


def encode(core: Core, texts: Sequence[str]) -> np.ndarray:
    """Text vectors of `texts` by the store's model, checked against the store's width."""
    return embed(core.encoders.encoder, texts, core.dim)


def add_items(core: Core, batch: list[Item], vectors: np.ndarray | None, upsert: bool) -> None:
    with core.lock.write():
        check_duplicates(core, batch, upsert)
        if vectors is None:
            vecs = encode(core, [item_text(i) for i in batch])
        else:
            vecs = given_vectors(vectors, len(batch), core.dim or core.encoders.encoder.dim)
        core.log_and_apply(AddRecord(int(time.time()), tuple(batch), vecs))


def ingest(core: Core, batch: list[Item], upsert: bool, progress: bool | None,
           embedder: BatchEmbedder | None) -> None:
    """Embed outside the lock, then apply and save a snapshot (not logged: the snapshot is)."""
    with core.lock.write():
        check_duplicates(core, batch, upsert)
    texts = [item_text(i) for i in batch]
    if embedder is None:
        vecs = embed_many(core.encoders.encoder, texts, core.dim, progress)
    else:
        vecs = check_embedded(embedder.embed(texts, core.encoders.model_dir(), core.config.encoder_backend,
                                             progress), len(texts), core.dim)
        vecs = given_vectors(vecs, len(texts), vecs.shape[1])  # non-zero, at unit length
    with core.lock.write():
        check_duplicates(core, batch, upsert)
        core.apply(AddRecord(int(time.time()), tuple(batch), vecs))
        core.commit()


def check_duplicates(core: Core, batch: list[Item], upsert: bool) -> None:
    st = core.state
    if upsert or st is None:
        return
    dup = [i.item_id for i in batch if st.items.live_row(i.item_id) is not None]
    if dup:
        raise DuplicateItemError(f"{len(dup)} item id(s) already in the store (e.g. {dup[0]!r}); "
                                 "ids must be new unless upsert=True")


def remove_items(core: Core, ids: list[str]) -> None:
    with core.lock.write():
        missing = [i for i in ids if core.state is None or core.state.items.live_row(i) is None]
        if missing:
            raise UnknownItemError(f"unknown item id(s): {', '.join(map(repr, missing[:5]))}; nothing removed")
        if ids:
            core.log_and_apply(RemoveRecord(tuple(ids)))


def record(core: Core, rec: EventRecord) -> bool:
    with core.lock.write():
        if core.state is None or core.state.items.live_row(rec.item_id) is None:
            raise UnknownItemError(f"unknown item id {rec.item_id!r}")
        if rec.event_id is not None and core.state.holds_event_id(rec.event_id):
            return False
        written = core.write_and_apply([rec])
    core.await_sync(*written)
    core.steps.wake()  # after the fsync: a step running during it delays this return (the GIL)
    return True


def record_many(core: Core, events: Sequence[Event], profiles: Sequence[str | None] | None) -> list[str]:
    """Check every event and profile (the message names the event's index), then record them."""
    profiles = [None] * len(events) if profiles is None else list(profiles)
    if len(profiles) != len(events):
        raise InvalidInputError(f"profiles must hold one entry per event; got {len(profiles)} for {len(events)}")
    recs = []
    for n, (e, prof) in enumerate(zip(events, profiles)):
        try:
            recs.append(event_record(e.user_id, e.item_id, e.event, e.value, e.timestamp, e.event_id))
            if prof is not None:
                check_text(prof, "profile")
        except InvalidInputError as exc:
            raise InvalidInputError(f"events[{n}]: {exc}") from exc
    with core.lock.write():
        if core.state is None:
            return ["unknown_item"] * len(recs)
        out, batch = batch_outcomes(core.state, recs, profiles)
        texts = list(dict.fromkeys(r[1] for r in batch if isinstance(r, tuple)))
        vecs = dict(zip(texts, encode(core, texts))) if texts else {}
        batch = [ProfileRecord(r[0], r[1], vecs[r[1]]) if isinstance(r, tuple) else r for r in batch]
        if not batch:
            return out
        written = core.write_and_apply(batch)
    core.await_sync(*written)
    core.steps.wake()
    return out


def import_events(core: Core, recs: list[EventRecord]) -> dict[str, int]:
    with core.lock.write():
        require_items(core)
        fresh, out = new_history(core.state, recs)
        for start in range(0, len(fresh), IMPORT_CHUNK):
            core.log_and_apply(ImportRecord(tuple(fresh[start:start + IMPORT_CHUNK])))
    return out


def set_profile(core: Core, user_id: str, profile: str) -> None:
    with core.lock.write():
        require_items(core)
        core.log_and_apply(ProfileRecord(user_id, profile, encode(core, [profile])[0]))


def require_items(core: Core) -> None:
    if core.state is None or not len(core.state.items):
        raise InvalidInputError("the store holds no items yet; add items first")


def batch_outcomes(state: State, recs: list[EventRecord], profiles: list[str | None]) -> tuple[list[str], list[Any]]:
    """Each event's outcome in a batch (Engine.record_many), and what to log in order:
    EventRecords, and (user_id, profile text) in front of an event whose user's profile
    changes (made a ProfileRecord once the batch's new texts are embedded, in one call)."""
    out, batch, ids, prof_now = [], [], set(), {}
    for r, prof in zip(recs, profiles):
        if r.event_id is not None and (r.event_id in ids or state.holds_event_id(r.event_id)):
            out.append("duplicate")
            continue
        if state.items.live_row(r.item_id) is None:
            out.append("unknown_item")
            continue
        if r.event_id is not None:
            ids.add(r.event_id)
        user = state.users.get(r.user_id)
        current = prof_now.get(r.user_id, None if user is None else user.profile)
        if prof is not None and prof != current:
            batch.append((r.user_id, prof))
            prof_now[r.user_id] = prof
        batch.append(r)
        out.append("applied")
    return out, batch

def new_history(state: State, recs: list[EventRecord]) -> tuple[list[EventRecord], dict[str, int]]:
    """The events of an import the store does not hold yet (by identity, also within `recs`)
    on live items, and the counts `import_events` returns."""
    out = {"imported": 0, "already_held": 0, "unknown_item": 0}
    fresh, keys = [], set()
    for r in recs:
        key = r.key()
        if key in state.event_keys or key in keys:
            out["already_held"] += 1
        elif state.items.live_row(r.item_id) is None:
            out["unknown_item"] += 1
        else:
            keys.add(key)
            fresh.append(r)
    out["imported"] = len(fresh)
    return fresh, out

"""The facade: create or open a store, add and remove items, recommend, record feedback, save.

Each method checks its arguments (a broken rule is an InvalidInputError naming it), takes the
store's lock and delegates: the lifecycle and the log to runtime/core.py, reads to
runtime/queries.py, training to training/fit.py.

Example:
    >>> from engine import Engine, Item
    >>> with Engine.create("my-store") as eng:                      # doctest: +SKIP
    ...     eng.add_items([Item("m1", "Toy Story (1995)", categories=("Animation", "Children"))])
    ...     eng.recommend("alice", k=5, profile="I love animated films for children")
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .config import Config
from .errors import InvalidInputError, UnknownItemError, UnknownUserError
from .replica import FOLLOW_INTERVAL_S, Follower, check_interval
from .runtime import queries, requests, writes
from .runtime.core import Core
from .serving.filters import Filter, check_exclude, check_filter
from .storage.records import event_record
from .storage.store import StoreDir
from .text.catalog import check_text, validate_items
from .text.embedding import BatchEmbedder
from .text.encoder import TextEncoder
from .training.fit import fit_store
from .types import Event, Item, Recommendation, check_id
#: Users one `recommend_many` call may ask for: a batch's ANN results are held in memory at once.
MAX_BATCH_USERS = 10_000


class Engine:
    """A Kindling store, open for reading and (unless read_only) writing. Thread-safe."""

    def __init__(self, core: Core) -> None:
        self._core = core
        self._follower: Follower | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: Config | None = None,
               encoder: TextEncoder | None = None) -> "Engine":
        """Make a new store at `path` (absent or an empty directory)."""
        store = StoreDir(path, create=True)
        try:
            return cls(Core.create(store, config or Config(), encoder))
        except BaseException:
            store.release()
            raise

    @classmethod
    def open(cls, path: str | Path, encoder: TextEncoder | None = None, read_only: bool = False,
             follow: bool = False, follow_interval_s: float = FOLLOW_INTERVAL_S) -> "Engine":
        """Open an existing store: load the last snapshot and replay the event log after it.

        Args:
            read_only: open without the writer's lock; any number of processes may.
            follow: (read_only only) a replica: keep applying the records the writer appends, and
                its new snapshots, from a background thread polling every `follow_interval_s`
                seconds, until `close` (see engine.replica and `replica_lag`).
        """
        if follow and not read_only:
            raise InvalidInputError("follow=True needs read_only=True: a replica follows the store's "
                                    "one writer and never writes")
        interval = check_interval(follow_interval_s)
        store = StoreDir(path, read_only=read_only)
        try:
            eng = cls(Core.load(store, encoder))
            if follow:
                eng._follower = Follower(eng._core, interval)
                eng._follower.start()
            return eng
        except BaseException:
            store.release()
            raise

    def save(self) -> None:
        """Write a new snapshot atomically; the event log restarts empty after it."""
        self._core.check_writable()
        with self._core.lock.write():
            self._core.commit(log_continues=True)

    def close(self, save: bool = True) -> None:
        """Release the store, saving a snapshot first when writable, changed and `save` is true.

        With save=False acknowledged mutations stay in the event log and are replayed on open.
        Either way the online steps still waiting are taken first (and logged).
        """
        if self._follower is not None:  # before the lock: the follower may be waiting for it
            self._follower.stop()
        self._core.steps.stop()  # likewise
        self._core.close(save)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def path(self) -> Path:
        return self._core.path

    @property
    def config(self) -> Config:
        return self._core.config

    @property
    def encoder(self) -> TextEncoder:
        """The language model, loaded on first use (once, whichever thread asks first)."""
        return self._core.encoders.encoder

    # ---- mutations (validated, logged, then applied) -----------------------------------------
    def add_items(self, items: Iterable[Item | dict[str, Any]], vectors: np.ndarray | None = None,
                  upsert: bool = False) -> int:
        """Embed and index new items; they are recommendable when this returns.

        Args:
            items: Item objects or dicts with item_id, title, text, categories and, optionally,
                expires_at (unix seconds: from then on the item is never returned).
            vectors: optional precomputed text vectors, shape (n, dim) float32 (skips the model).
            upsert: replace items whose id is already live instead of rejecting the batch.
        Returns:
            The number of items added or replaced.
        Raises:
            InvalidInputError: a rule broken anywhere in the batch; nothing is added then.
        """
        self._core.check_writable()
        batch = validate_items(items)
        if batch:
            writes.add_items(self._core, batch, vectors, upsert)
        return len(batch)

    def ingest(self, items: Iterable[Item | dict[str, Any]], upsert: bool = False,
               progress: bool | None = None, embedder: BatchEmbedder | None = None) -> int:
        """Add a large batch atomically: embed all (with a progress bar), apply, save a snapshot.

        Nothing is half-ingested: a bad row, a failed embedding or a crash before the snapshot's
        manifest is swapped leaves the store as it was.

        Args:
            embedder: embed the batch elsewhere instead of with this process's encoder, e.g.
                `ray_embedding.RayEmbedder(address=None, workers=4)` (Ray Data, the scale extra);
                it loads the store's model (its tuned one, or `Config.model_path`) on its workers,
                from the same path: the store's folder must be readable there.
        """
        self._core.check_writable()
        batch = validate_items(items)
        if batch:
            writes.ingest(self._core, batch, upsert, progress, embedder)
        return len(batch)

    def remove_items(self, item_ids: Iterable[str]) -> int:
        """Remove items; no later search returns them. Unknown ids raise UnknownItemError."""
        self._core.check_writable()
        ids = list(dict.fromkeys(check_id(i, "item_id") for i in item_ids))
        writes.remove_items(self._core, ids)
        return len(ids)

    def record(self, user_id: str, item_id: str, event: str = "click", value: float = 1.0,
               timestamp: int | None = None, event_id: str | None = None) -> bool:
        """Log one click, skip, impression or dislike durably, and learn from it at once.

        The user's vector, history and the item's counts change before this returns; a click's
        reranker step is taken moments later by the step worker (`settle` takes it now).

        Returns once the event is in the fsynced log. The state learns from it just before (under
        the write lock) while the fsync runs outside the lock, shared with the records of other
        threads (group commit); if that fsync fails, the event is undone and StoreError raised.

        A dislike hides the item from this user for good (even with exclude_seen=False) and
        pushes the user vector away from it `Config.dislike_step` times as far as a click pulls.
        Timestamp defaults to now; value defaults to 1.0 and must be finite (no NaN or infinity).
        `event_id` (an id rule string, unique per event) makes the call idempotent: an id the
        store has applied before, in any earlier session, is not applied again.

        `value` is kept in the log with the event (a rating, say); the update does not depend on
        it. Map graded feedback to clicks and skips before recording (`read_events(min_value=)`).

        Returns:
            True when the event was applied; False when its `event_id` was already held.
        """
        self._core.check_writable()
        return writes.record(self._core, event_record(user_id, item_id, event, value, timestamp, event_id))

    def record_many(self, events: Sequence[Event], profiles: Sequence[str | None] | None = None) -> list[str]:
        """Record a batch of events with one write-lock hold and one fsync (a stream consumer's call).

        Each event is what `record` takes, in order; `profiles[n]`, when given and not None, is
        `events[n]`'s user's profile text, set (as `set_profile`) just before that event when it
        differs from the user's current one. Durable when this returns, like `record`.

        Returns:
            Per event: "applied"; "duplicate" (its `event_id` was applied before, or earlier in
            this batch; nothing is recorded for it, its profile included); or "unknown_item" (its
            item is not live; nothing is recorded for it).
        Raises:
            InvalidInputError: an event or profile breaks a rule of `record` (the message names
                its index); nothing of the batch is recorded then.
        """
        self._core.check_writable()
        return writes.record_many(self._core, events, profiles)

    def import_events(self, events: Iterable[Event]) -> dict[str, int]:
        """Bring past events into the store: user histories and vectors, item counts, co-clicks.

        Durable and logged like `record`, but without the per-event online step (training is
        `fit`'s job) and whatever `online_updates` says: this is history, not live feedback.
        Idempotent by event identity (user, item, kind, timestamp): an event the store already
        holds, imported or recorded, is skipped, so importing a log twice, or a log whose events
        went through `record`, counts each event once. Events on items the store does not hold
        (never added, or removed) are skipped.

        Returns:
            Counts: `imported`, `already_held`, `unknown_item`.
        """
        self._core.check_writable()
        return writes.import_events(self._core, [event_record(e.user_id, e.item_id, e.event, e.value, e.timestamp)
                                                 for e in events])

    def set_profile(self, user_id: str, profile: str) -> None:
        """Give a user a profile text (its vector seeds the user, weighing as many clicks as `fit`
        learned from the training users' profiles; one click before any fit saw a profile)."""
        self._core.check_writable()
        check_id(user_id, "user_id")
        check_text(profile, "profile")
        writes.set_profile(self._core, user_id, profile)

    # ---- queries -----------------------------------------------------------------------------
    def recommend(self, user_id: str, k: int = 10, profile: str | None = None, exclude_seen: bool = True,
                  candidates: Sequence[str] | None = None, exclude: Iterable[str] | None = None,
                  history: Sequence[str] | None = None, filter: Filter | None = None,
                  explain: bool = False, diversity: float = 0.0) -> list[Recommendation]:
        """Top-k items for a user, new or known.

        Args:
            profile: a new user's self-description; it seeds the user (and is saved) when the
                user has no profile yet and the store is writable.
            exclude_seen: leave out what the user clicked or skipped.
            candidates: rank only these item ids (unknown or removed ones are ignored).
            exclude: more item ids to leave out.
            history: a stateless request: rank for a user whose clicks are these item ids
                (oldest first), built with the online rule from the model as it stands. Nothing
                is recorded or saved and the stored user `user_id` (if any) is not consulted;
                `profile`, when given, seeds that transient user only.
            filter: business rules (`engine.Filter`: categories and ids to keep or leave out),
                applied inside the search: k items come back whenever k items qualify.
            explain: give each Recommendation a `because` (`engine.Because`): the click or the
                profile its text is nearest to (with the cosine), or "popular" (with the click
                count), or "new item".
            diversity: 0 (default) to 1: reorder the scored candidates by maximal marginal
                relevance on their item vectors, trading score for items unlike those above
                them; 0 keeps the score order exactly.

        Raises:
            UnknownItemError: an id in `history` is not a live item.
            InvalidInputError: a rule broken by an argument (nothing is saved then).
        """
        check_id(user_id, "user_id")
        q = queries.make_query(k, exclude_seen, candidates, exclude, filter, explain, diversity)
        if profile is not None:
            check_text(profile, "profile")
        if history is not None:
            if isinstance(history, str):
                raise TypeError("history must be a sequence of item ids, not one string")
            for item_id in history:
                check_id(item_id, "history item_id")
        return requests.recommend(self._core, user_id, q, profile, history)

    def recommend_many(self, user_ids: Sequence[str], k: int = 10, exclude_seen: bool = True,
                       filter: Filter | None = None, explain: bool = False,
                       diversity: float = 0.0) -> list[list[Recommendation]]:
        """`recommend` for several stored (or unknown, hence new) users at once.

        The users' ANN candidates come from one batched FAISS search; on an exact index each
        list is what `recommend(user_id, k, ...)` with the same arguments returns (on HNSW or
        IVF it can differ where the approximate search does; see Ranker.search_many).

        Returns:
            One list per id of `user_ids`, in that order.
        Raises:
            InvalidInputError: `user_ids` is one string, too long, or holds an invalid id.
        """
        if isinstance(user_ids, str) or not isinstance(user_ids, Sequence):
            raise InvalidInputError(f"user_ids must be a list of user ids; got {type(user_ids).__name__}")
        if len(user_ids) > MAX_BATCH_USERS:
            raise InvalidInputError(f"user_ids must hold at most {MAX_BATCH_USERS:,} ids; got {len(user_ids):,}")
        for user_id in user_ids:
            check_id(user_id, "each user_id")
        q = queries.make_query(k, exclude_seen, None, None, filter, explain, diversity)
        return requests.recommend_many(self._core, user_ids, q)

    def similar_items(self, item_id: str, k: int = 10, filter: Filter | None = None,
                      exclude: Iterable[str] | None = None) -> list[Recommendation]:
        """The k live items closest to `item_id` in retrieval space (itself excluded).

        Args:
            filter: business rules (`engine.Filter`), applied inside the search as in `recommend`:
                k items come back whenever k items qualify.
            exclude: more item ids to leave out.

        Raises:
            UnknownItemError: `item_id` is not a live item.
            InvalidInputError: a rule broken by an argument.
        """
        check_id(item_id, "item_id")
        queries.check_k(k)
        flt, excluded = check_filter(filter), check_exclude(exclude)
        with self._core.lock.read():
            st = self._core.state
            row = None if st is None else st.items.live_row(item_id)
            if row is None:
                raise UnknownItemError(f"unknown item id {item_id!r}")
            return queries.similar(st, row, k, int(time.time()), flt, excluded)

    def get_item(self, item_id: str) -> Item:
        with self._core.lock.read():
            st = self._core.state
            row = None if st is None else st.items.live_row(item_id)
            if row is None:
                raise UnknownItemError(f"unknown item id {item_id!r}")
            return st.items.item(row)

    def user_history(self, user_id: str) -> list[str]:
        """Item ids the user clicked, oldest first."""
        with self._core.lock.read():
            st = self._core.state
            user = None if st is None else st.users.get(user_id)
            if user is None:
                raise UnknownUserError(f"unknown user id {user_id!r}")
            return [st.items.vocab.id(r) for r in user.clicks]

    def __contains__(self, item_id: object) -> bool:
        if not isinstance(item_id, str):
            return False
        with self._core.lock.read():
            st = self._core.state
            return st is not None and st.items.live_row(item_id) is not None

    def stats(self) -> dict[str, Any]:
        """Counts, sizes and settings, for `kindling stats`."""
        with self._core.lock.read():
            out = self._core.stats()
        return {**out, "replica": self.replica_lag()} if self._follower is not None else out

    def replica_lag(self) -> dict[str, Any] | None:
        """A following replica's position (applied_seq, generation, behind_s, error, ...); else None."""
        return None if self._follower is None else self._follower.lag()

    def log_position(self) -> int:
        """The sequence number of the next log record: the writer has logged every record below
        it; a read-only engine (a replica) holds every record below it in its state.

        A replica that reaches the writer's position after a write shows that write
        (`kindling serve --workers` waits for it). One integer read, no lock.
        """
        return self._core.log_position()

    # ---- learning ----------------------------------------------------------------------------
    def settle(self) -> int:
        """Take now, in this thread, the online steps still waiting for recorded clicks.

        `record` returns before its click's reranker step (the step worker takes it a few
        milliseconds later): a script that needs the next answer to reflect every click so far
        (an evaluation, a demo) calls this first. Returns the steps taken or found empty here.
        """
        n = 0
        while self._core.steps.once():
            n += 1
        return n

    def fit(self, events: Iterable[Event], progress: bool | None = None) -> dict[str, Any]:
        """Train the item tower and the reranker on `events`, then save.

        Training only: no user history, vector or count changes from these events (bring past
        events into the store with `import_events`). Fitting the same events twice leaves the
        same state as fitting once. The click histories in `events` (on live items, in order)
        are the training data; what serving features count (clicks, co-clicks) is read from the
        store as it stands, with each held-out user's own clicks taken out.

        Returns:
            A summary of what was trained (epochs, losses, counts).
        """
        self._core.check_writable()
        recs = [event_record(e.user_id, e.item_id, e.event, e.value, e.timestamp) for e in events]
        with self._core.lock.write():
            writes.require_items(self._core)
            return fit_store(self._core, recs, progress if progress is not None else sys.stderr.isatty())


__all__ = ["Engine"]

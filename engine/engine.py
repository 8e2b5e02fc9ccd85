"""The facade: create or open a store, add and remove items, recommend, record feedback, save.

Example:
    >>> from engine import Engine, Item
    >>> with Engine.create("my-store") as eng:                      # doctest: +SKIP
    ...     eng.add_items([Item("m1", "Toy Story (1995)", categories=("Animation", "Children"))])
    ...     eng.recommend("alice", k=5, profile="I love animated films for children")
"""

from __future__ import annotations

import logging
import math
import secrets
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .text.catalog import check_text, item_text, validate_items
from .config import Config
from .text.embedding import BatchEmbedder, check_embedded, embed, embed_many, given_vectors
from .text.encoder import Encoder, TextEncoder, default_model_path
from .errors import (
    DuplicateItemError, InvalidInputError, ReadOnlyStoreError, StoreError, UnknownItemError, UnknownUserError,
)
from .storage.eventlog import EventLog, LogSyncError, read_log
from .locks import RWLock
from .memory import release_free_memory
from .replica import FOLLOW_INTERVAL_S, Follower, check_interval
from .storage.records import (
    AddRecord, EventRecord, ImportRecord, ProfileRecord, Record, RemoveRecord, from_payload, to_payload,
)
from .storage.snapshot import map_saved_vectors, read_generation, write_generation
from .serving import queries
from .serving.filters import Filter, check_exclude, check_filter
from .serving.ranking import NeedsWrite
from .state.apply import State
from .stepper import StepWorker
from .storage.store import FORMAT, FORMAT_VERSION, TUNED_FORMAT_VERSION, StoreDir
from .training.fit import TuneRequest, fit_state
from .types import EVENT_KINDS, Event, Item, Recommendation
from .state.vocab import check_id

log = logging.getLogger(__name__)

#: Events per import record: a record stays far below the log's 64 MiB cap, and a crash in the
#: middle of a long import leaves whole records that a second import completes.
IMPORT_CHUNK = 20_000
#: Users one `recommend_many` call may ask for: a batch's ANN results are held in memory at once.
MAX_BATCH_USERS = 10_000


class Engine:
    """A Kindling store, open for reading and (unless read_only) writing. Thread-safe."""

    def __init__(self, store: StoreDir, config: Config, encoder: TextEncoder | None) -> None:
        self._store, self.config = store, config
        if config.blas_threads:  # process-wide, as Config.blas_threads says
            from .threads import numpy_blas

            numpy_blas().limit(limits=config.blas_threads)
        self._encoder = encoder
        self._encoder_lock = threading.Lock()  # loading the model must not hold up the state's lock
        self._tuned_dir: Path | None = None  # the store's tuned language model (manifest model.tuned)
        self._tuned_files: dict[str, Any] = {}  # its files as the manifest describes them
        self._lock = RWLock()
        self._state: State | None = None
        self._log: EventLog | None = None
        self._gen = 0
        self._dirty = False
        self._replayed_seq = 0
        self._closed = False
        self._manifest: dict[str, Any] = {}
        self._follower: Follower | None = None
        self._milvus = None  # the MilvusHome of a writable store with index_backend "milvus"
        self._step_mutex = threading.Lock()  # one online step at a time (the worker, `settle`)
        self._stepper: StepWorker | None = None  # started by the first click that waits for a step
        self._step_lags: deque[float] = deque(maxlen=1024)  # seconds from a click to its step

    # ---- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: Config | None = None,
               encoder: TextEncoder | None = None) -> "Engine":
        """Make a new store at `path` (absent or an empty directory)."""
        store = StoreDir(path, create=True)
        try:
            eng = cls(store, config or Config(), encoder)
            eng._manifest = {"created_at": int(time.time())}
            if eng.config.index_backend == "milvus":  # the store's collection names, fixed for good
                eng._manifest["milvus"] = {"prefix": "kindling_" + secrets.token_hex(6), "collection": None}
            if encoder is not None:
                eng._state = eng._new_state(encoder.dim)
            eng._commit(initial=True)
        except BaseException:
            if "eng" in locals():
                eng._release_milvus()
            store.release()
            raise
        return eng

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
            eng = cls._open_snapshot(store, encoder)
            if follow:
                eng._follower = Follower(eng, interval)
                eng._follower.start()
            return eng
        except BaseException:
            store.release()
            raise

    @classmethod
    def _open_snapshot(cls, store: StoreDir, encoder: TextEncoder | None, tries: int = 5) -> "Engine":
        """Load the snapshot the manifest names and replay its log.

        A read-only open races the writer's saves: the files of the snapshot it picked may be
        deleted between reading the manifest and pinning them; it then retries with the newer
        manifest (real damage fails every time). Once pinned, a save cannot pull them away.
        """
        for attempt in range(tries):
            manifest = store.read_manifest()
            try:
                handles = store.pin(manifest)  # held open, the files outlive the writer's cleanup
                try:
                    store.verify(manifest, handles)
                    eng = cls(store, Config.from_dict(manifest.get("config", {})), encoder)
                    try:
                        eng._load(manifest, handles)
                    except BaseException:
                        eng._release_milvus()
                        raise
                    return eng
                finally:
                    for fh in handles.values():
                        fh.close()
            except (StoreError, FileNotFoundError):
                if (not store.read_only or attempt == tries - 1
                        or store.manifest_generation() == manifest.get("generation")):
                    raise
        raise AssertionError("unreachable")

    def _load(self, manifest: dict[str, Any], handles: dict[str, Any] | None = None) -> None:
        self._manifest, self._gen = manifest, int(manifest["generation"])
        self._use_tuned((manifest.get("model") or {}).get("tuned"), manifest.get("files", {}))
        d_text = manifest.get("model", {}).get("dim")
        handles = handles or {}
        if d_text:
            items, users, models, index_path, keys, ids = read_generation(self._store, manifest, d_text, handles)
            self._state = self._new_state(int(d_text))
            self._state.milvus_collection = (manifest.get("milvus") or {}).get("collection")
            self._state.deferred_steps = manifest.get("online_steps") == "deferred"
            self._state.load(items, users, models, index_path,
                             None if index_path is None else handles.get(index_path.name),
                             self._store.file("models", self._gen, "safetensors"), keys, ids)
        log_fh = handles.get(manifest["log"])
        self._replay(self._store.path / manifest["log"], manifest["next_seq"],
                     None if log_fh is None or not self._store.read_only else log_fh.read())
        if not self._store.read_only:
            self._store.cleanup(manifest)
            if self._state is not None and self._state.reconcile_index():
                self._dirty = True
            self._drop_stale_collections(manifest)
            self._wake_stepper()  # clicks whose step the log does not hold yet
        release_free_memory()  # the snapshot's Arrow tables and the build's temporaries

    def _use_tuned(self, name: str | None, files: dict[str, Any]) -> None:
        """Embed with the tuned model folder `name` of this store (None: the configured model).

        An encoder given to `open`/`create` is kept unless it has a `model_path` (an `Encoder`)
        naming another model than the store's tuned one, or a stale tuned folder of this store:
        the store's items were embedded by the tuned model, and new ones must be too (a caller's
        own encoder without a `model_path` is the caller's to keep consistent)."""
        self._tuned_dir = None if not name else self._store.encoder_path(name)
        self._tuned_files = {k: v for k, v in files.items() if name and k.startswith(name + "/")}
        folder = getattr(self._encoder, "model_path", None)  # an Encoder's; a caller's own has none
        if isinstance(folder, str) and Path(folder).resolve() != Path(self._model_dir()).resolve():
            if self._tuned_dir is not None or Path(folder).resolve().parent == self.path.resolve():
                self._encoder = None  # loaded again, from the store's model, on first use

    def _model_dir(self) -> str:
        """The folder the store embeds with: its tuned model, or the configured one."""
        if self._tuned_dir is not None:
            return str(self._tuned_dir)
        return self.config.model_path or default_model_path()

    def _new_state(self, d_text: int) -> State:
        """An empty State; on a writable Milvus store, wired to the store's collection."""
        state = State(self.config, d_text)
        if self.config.index_backend == "milvus" and not self._store.read_only:
            if self._milvus is None:
                from .serving.milvus import MilvusHome, resolve_uri
                self._milvus = MilvusHome(resolve_uri(self.config.milvus_uri, self.path),
                                          (self._manifest.get("milvus") or {}).get("prefix"))
            state.milvus = self._milvus
        return state

    def _milvus_meta(self) -> dict[str, Any] | None:
        """The manifest's record of the Milvus collection this snapshot's rows are in."""
        if self._milvus is None:
            return self._manifest.get("milvus")
        index = None if self._state is None else self._state.index
        return self._milvus.describe(getattr(index, "collection", None))

    def _drop_stale_collections(self, manifest: dict[str, Any]) -> None:
        """Drop the store's collections that neither the manifest nor memory uses (a crash or a
        failed save left them)."""
        if self._milvus is not None:
            index = None if self._state is None else self._state.index
            self._milvus.drop_others([(manifest.get("milvus") or {}).get("collection"),
                                      getattr(index, "collection", None)])

    def _replay(self, path: Path, next_seq: int, data: bytes | None = None) -> None:
        n = 0
        for seq, payload in read_log(path, repair=not self._store.read_only, first_seq=next_seq, data=data):
            dim = None if self._state is None else self._state.items.dim
            self._apply(from_payload(payload, dim, f"{path}, record {seq}"))
            next_seq, n = seq + 1, n + 1
        if n:
            log.info("replayed %d logged mutations from %s", n, path.name)
            self._dirty = True
        self._replayed_seq = next_seq  # a read-only engine has no log but can still count pending records
        if not self._store.read_only:
            self._log = EventLog(path, next_seq, fsync=self.config.fsync)

    def save(self) -> None:
        """Write a new snapshot atomically; the event log restarts empty after it."""
        self._check_writable()
        with self._lock.write():
            self._commit(log_continues=True)

    def _commit(self, initial: bool = False, log_continues: bool = False) -> None:
        """Write the next generation and swap the manifest to it: all or nothing.

        On failure the half-written generation is deleted and the in-memory state is reloaded
        from the previous snapshot and the log, so memory never holds what the disk does not (an
        ingest or fit that could not be saved is undone). If the manifest was swapped but the
        directory fsync failed, the new generation is adopted (memory and disk agree) and the
        error is raised all the same: the save is not known to be durable.
        """
        gen = self._gen if initial else self._gen + 1
        manifest = None
        self._drain_steps()  # the snapshot holds every step its events call for
        if self._log is not None:
            try:  # the snapshot may hold only what the log already holds durably
                self._log.sync_all()
            except LogSyncError as exc:
                self._undo_unsynced(self._log)
                raise StoreError(f"{self.path}: the snapshot was not saved ({exc})") from exc
        try:
            manifest = self._write_snapshot(gen, log_continues)
            self._store.write_manifest(manifest)
        except Exception as exc:
            if manifest is not None and self._store.manifest_generation() == gen:
                self._adopt(manifest)
                raise StoreError(f"{self.path}: snapshot {gen} was written but is not known to be "
                                 f"durable ({_reason(exc)})") from exc
            self._store.cleanup(self._manifest)
            if not initial:
                self._restore()
            raise StoreError(f"{self.path}: the snapshot was not saved and the previous one stands "
                             f"({_reason(exc)})") from exc
        self._adopt(manifest)

    def _write_snapshot(self, gen: int, log_continues: bool = False) -> dict[str, Any]:
        """Write every file of generation `gen` (fsynced) and return its manifest, not yet swapped in.

        `log_continues`: the snapshot is exactly the previous one plus its log's records (a plain
        save, not an ingest or a fit), so a replica holding those may go on to the new log unreloaded.
        """
        paths = []
        st = self._state
        if st is not None:
            paths = write_generation(self._store, gen, st.items, st.users, st.ranker.model_tensors(st.proj),
                                     st.index, st.event_key_array(), st.event_id_array())
        log_path = self._store.file("events", gen, "log")
        log_path.touch()
        next_seq = self._log.next_seq if self._log else 0
        files = self._store.describe(paths)
        if self._tuned_dir is not None:
            if not self._tuned_files:  # tuned by this fit: fsynced and hashed once
                self._tuned_files = self._store.describe_tree(self._tuned_dir)
            files.update(self._tuned_files)
        manifest = {
            "format": FORMAT, "kindling_version": __version__,
            "format_version": FORMAT_VERSION if self._tuned_dir is None else TUNED_FORMAT_VERSION,
            "created_at": self._manifest.get("created_at", int(time.time())), "saved_at": int(time.time()),
            "generation": gen, "config": self.config.to_dict(), "libraries": _library_versions(),
            "model": self._model_meta(), "files": files, "log": log_path.name,
            "next_seq": next_seq, "counts": self._counts(), "log_continues": log_continues,
            "online_steps": "deferred",
        }
        if self._milvus_meta() is not None:
            manifest["milvus"] = self._milvus_meta()
        return manifest

    def _adopt(self, manifest: dict[str, Any]) -> None:
        """Switch to the generation `manifest` names: its log takes the next records."""
        if self._log:
            self._log.close()
        self._log = EventLog(self._store.path / manifest["log"], manifest["next_seq"], fsync=self.config.fsync)
        self._manifest, self._gen, self._dirty = manifest, int(manifest["generation"]), False
        if self._state is not None:
            self._state.deferred_steps = True  # this generation's log is written that way
            try:  # one copy of the item vectors: the file just saved, mapped (storage/mapped.py)
                map_saved_vectors(self._store, manifest, self._state.items)
            except (StoreError, ValueError, OSError) as exc:
                log.warning("%s: the item vectors stay in memory (%s)", self.path, exc)
        self._store.cleanup(manifest)
        self._drop_stale_collections(manifest)
        if self._state is not None:
            self._state.ranker.invalidate_popular()  # a restart recomputes it: keep lists identical
        release_free_memory()  # the tables the snapshot was written from

    def _restore(self) -> None:
        """Drop the in-memory state and reload the last snapshot plus the log (a failed commit)."""
        if self._log:
            self._log.close()
        self._log, self._state, self._dirty = None, None, False
        try:
            self._load(self._store.read_manifest())
        except BaseException:
            self._closed = True  # neither the old nor the new state is in memory: refuse to go on
            self._release_milvus()
            self._store.release()
            raise

    def close(self, save: bool = True) -> None:
        """Release the store, saving a snapshot first when writable, changed and `save` is true.

        With save=False acknowledged mutations stay in the event log and are replayed on open.
        Either way the online steps still waiting are taken first (and logged).
        """
        if self._follower is not None:  # before the lock: the follower may be waiting for it
            self._follower.stop()
        if self._stepper is not None:  # likewise
            self._stepper.stop()
        with self._lock.write():  # no mutation is half way through when the log closes
            if self._closed:
                return
            try:
                if not self._store.read_only:
                    self._drain_before_close()
                if save and not self._store.read_only and self._dirty:
                    self.save()
            finally:
                if self._log:
                    self._log.close()
                self._release_milvus()
                self._store.release()
                self._closed = True

    def _release_milvus(self) -> None:
        if self._milvus is not None:
            self._milvus.close()
            self._milvus = None

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- helpers -----------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self._store.path

    @property
    def encoder(self) -> TextEncoder:
        """The language model, loaded on first use (once, whichever thread asks first)."""
        with self._encoder_lock:
            if self._encoder is None:
                self._encoder = self._make_encoder(self._model_dir())
            return self._encoder

    def _make_encoder(self, path: str) -> Encoder:
        return Encoder(path, batch_size=self.config.batch_size, show_progress=False,
                       backend=self.config.encoder_backend)

    def _model_meta(self) -> dict[str, Any]:
        if self._state is None:
            return {"path": self.config.model_path, "dim": None}
        meta = {"path": self.config.model_path, "dim": self._state.items.dim,
                "name": getattr(self._encoder, "name", self._manifest.get("model", {}).get("name"))}
        if self._tuned_dir is not None:
            meta["tuned"] = self._tuned_dir.name
        return meta

    def _counts(self) -> dict[str, int]:
        if self._state is None:
            return {"items": 0, "live_items": 0, "users": 0}
        return self._state.counts()

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: the engine is closed")
        if self._store.read_only:
            raise ReadOnlyStoreError(f"{self.path}: opened read-only; writes go to the store's one writer "
                                     "(Engine.open without read_only)")

    def _dim(self) -> int | None:
        """The store's text-vector width (None before the first item)."""
        return None if self._state is None else self._state.items.dim

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        return embed(self.encoder, texts, self._dim())

    # ---- mutations (validated, logged, then applied) -----------------------------------------
    def _log_and_apply(self, rec: Record) -> None:
        """Write-ahead: the record is durable in the log before the state changes. The caller
        holds the write lock."""
        try:
            self._log.append(to_payload(rec))
        except LogSyncError as exc:
            self._undo_unsynced(self._log)
            raise StoreError(f"{self.path}: the change was not recorded ({exc})") from exc
        self._apply(rec)

    def _undo_unsynced(self, event_log: EventLog) -> None:
        """After a failed fsync (write lock held): cut the records it did not cover off the log,
        and reload the state from the disk, so memory holds nothing the disk may not."""
        if event_log is self._log and event_log.rewind():
            self._restore()

    def _apply(self, rec: Record) -> None:
        if self._state is None and isinstance(rec, AddRecord):
            self._state = self._new_state(rec.vectors.shape[1])
        self._state.apply(rec)
        self._dirty = True

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
        self._check_writable()
        batch = validate_items(items)
        if not batch:
            return 0
        with self._lock.write():
            self._check_duplicates(batch, upsert)
            vecs = self._batch_vectors(batch, vectors)
            self._log_and_apply(AddRecord(int(time.time()), tuple(batch), vecs))
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
        self._check_writable()
        batch = validate_items(items)
        if not batch:
            return 0
        with self._lock.write():
            self._check_duplicates(batch, upsert)
        texts = [item_text(i) for i in batch]
        if embedder is None:
            vecs = embed_many(self.encoder, texts, self._dim(), progress)
        else:
            vecs = check_embedded(embedder.embed(texts, self._model_dir(), self.config.encoder_backend,
                                                 progress), len(texts), self._dim())
            vecs = given_vectors(vecs, len(texts), vecs.shape[1])  # non-zero, at unit length
        with self._lock.write():
            self._check_duplicates(batch, upsert)
            self._apply(AddRecord(int(time.time()), tuple(batch), vecs))  # not logged: the snapshot is
            self._commit()
        return len(batch)

    def _check_duplicates(self, batch: list[Item], upsert: bool) -> None:
        if upsert or self._state is None:
            return
        dup = [i.item_id for i in batch if self._state.items.live_row(i.item_id) is not None]
        if dup:
            raise DuplicateItemError(f"{len(dup)} item id(s) already in the store (e.g. {dup[0]!r}); "
                                    "ids must be new unless upsert=True")

    def _batch_vectors(self, batch: list[Item], vectors: np.ndarray | None) -> np.ndarray:
        if vectors is None:
            return self._encode([item_text(i) for i in batch])
        return given_vectors(vectors, len(batch), self._dim() or self.encoder.dim)

    def remove_items(self, item_ids: Iterable[str]) -> int:
        """Remove items; no later search returns them. Unknown ids raise UnknownItemError."""
        self._check_writable()
        ids = list(dict.fromkeys(check_id(i, "item_id") for i in item_ids))
        with self._lock.write():
            missing = [i for i in ids if self._state is None or self._state.items.live_row(i) is None]
            if missing:
                raise UnknownItemError(f"unknown item id(s): {', '.join(map(repr, missing[:5]))}; nothing removed")
            if ids:
                self._log_and_apply(RemoveRecord(tuple(ids)))
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
        self._check_writable()
        rec = _event_record(user_id, item_id, event, value, timestamp, event_id)
        with self._lock.write():
            if self._state is None or self._state.items.live_row(item_id) is None:
                raise UnknownItemError(f"unknown item id {item_id!r}")
            if event_id is not None and self._state.holds_event_id(event_id):
                return False
            event_log = self._log
            ticket = event_log.write([to_payload(rec)])
            self._apply(rec)
        self._await_sync(event_log, ticket)
        self._wake_stepper()  # after the fsync: a step running during it delays this return (the GIL)
        return True

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
        self._check_writable()
        profiles = [None] * len(events) if profiles is None else list(profiles)
        if len(profiles) != len(events):
            raise InvalidInputError(f"profiles must hold one entry per event; got {len(profiles)} for {len(events)}")
        recs = []
        for n, (e, prof) in enumerate(zip(events, profiles)):
            try:
                recs.append(_event_record(e.user_id, e.item_id, e.event, e.value, e.timestamp, e.event_id))
                if prof is not None:
                    check_text(prof, "profile")
            except InvalidInputError as exc:
                raise InvalidInputError(f"events[{n}]: {exc}") from exc
        with self._lock.write():
            out, batch = self._batch_outcomes(recs, profiles)
            texts = list(dict.fromkeys(r[1] for r in batch if isinstance(r, tuple)))
            vecs = dict(zip(texts, self._encode(texts))) if texts else {}
            batch = [ProfileRecord(r[0], r[1], vecs[r[1]]) if isinstance(r, tuple) else r for r in batch]
            if not batch:
                return out
            event_log = self._log
            ticket = event_log.write([to_payload(r) for r in batch])
            for r in batch:
                self._apply(r)
        self._await_sync(event_log, ticket)
        self._wake_stepper()
        return out

    def _await_sync(self, event_log: EventLog, ticket: tuple[int, int]) -> None:
        """Group commit: wait, outside the write lock, for the fsync that covers `ticket` (shared
        with the records of concurrent writers); on a failure undo what it did not cover."""
        try:
            event_log.sync(ticket)
        except LogSyncError as exc:
            with self._lock.write():
                self._undo_unsynced(event_log)
            raise StoreError(f"{self.path}: the event was not recorded ({exc})") from exc

    def _batch_outcomes(self, recs: list[EventRecord], profiles: list[str | None]) -> tuple[list[str], list[Any]]:
        """Each event's outcome, and what to log in order: EventRecords, and (user_id, profile
        text) in front of an event whose user's profile changes (made a ProfileRecord once the
        batch's new texts are embedded, in one encoder call)."""
        st = self._state
        out, batch, ids, prof_now = [], [], set(), {}
        for r, prof in zip(recs, profiles):
            if r.event_id is not None and (r.event_id in ids or (st is not None and st.holds_event_id(r.event_id))):
                out.append("duplicate")
                continue
            if st is None or st.items.live_row(r.item_id) is None:
                out.append("unknown_item")
                continue
            if r.event_id is not None:
                ids.add(r.event_id)
            user = st.users.get(r.user_id)
            current = prof_now.get(r.user_id, None if user is None else user.profile)
            if prof is not None and prof != current:
                batch.append((r.user_id, prof))
                prof_now[r.user_id] = prof
            batch.append(r)
            out.append("applied")
        return out, batch

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
        self._check_writable()
        recs = [_event_record(e.user_id, e.item_id, e.event, e.value, e.timestamp) for e in events]
        out = {"imported": 0, "already_held": 0, "unknown_item": 0}
        with self._lock.write():
            self._require_items()
            fresh, keys = [], set()
            for r in recs:
                key = r.key()
                if key in self._state.event_keys or key in keys:
                    out["already_held"] += 1
                elif self._state.items.live_row(r.item_id) is None:
                    out["unknown_item"] += 1
                else:
                    keys.add(key)
                    fresh.append(r)
            for start in range(0, len(fresh), IMPORT_CHUNK):
                self._log_and_apply(ImportRecord(tuple(fresh[start:start + IMPORT_CHUNK])))
            out["imported"] = len(fresh)
        return out

    def set_profile(self, user_id: str, profile: str) -> None:
        """Give a user a profile text (its vector seeds the user, weighing as many clicks as `fit`
        learned from the training users' profiles; one click before any fit saw a profile)."""
        self._check_writable()
        check_id(user_id, "user_id")
        check_text(profile, "profile")
        with self._lock.write():
            self._require_items()
            vec = self._encode([profile])[0]
            self._log_and_apply(ProfileRecord(user_id, profile, vec))

    def _require_items(self) -> None:
        if self._state is None or not len(self._state.items):
            raise InvalidInputError("the store holds no items yet; add items first")

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
        q = _query(k, exclude_seen, candidates, exclude, filter, explain, diversity)
        if profile is not None:
            check_text(profile, "profile")
        if history is not None:
            return self._recommend_stateless(user_id, profile, history, q)
        if profile is not None and not self._store.read_only:
            with self._lock.read():
                user = self._state.users.get(user_id) if self._state is not None else None
                seeded = user is not None and user.profile == profile
            if not seeded:
                self.set_profile(user_id, profile)
        profile_vec = None
        if profile is not None and self._store.read_only:  # a new user's profile, used unsaved
            with self._lock.read():
                known = self._state is not None and self._state.users.get(user_id) is not None
            if not known:
                profile_vec = self._encode([profile])[0]

        def answer(refresh: bool) -> list[Recommendation]:
            st = self._state
            if st is None or st.index is None:
                return []
            user = queries.stored_or_new_user(st, user_id, profile, profile_vec)
            return queries.ranked(st, user, user_id, replace(q, now=int(time.time())), refresh)

        return self._read(answer)

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
        q = _query(k, exclude_seen, None, None, filter, explain, diversity)

        def answer(refresh: bool) -> list[list[Recommendation]]:
            st = self._state
            if st is None or st.index is None:
                return [[] for _ in user_ids]
            users = [queries.stored_or_new_user(st, u, None, None) for u in user_ids]
            return queries.ranked_many(st, users, user_ids, replace(q, now=int(time.time())), refresh)

        return self._read(answer)

    def _read(self, query: Callable[[bool], Any]) -> Any:
        """`query(False)` under the read lock; if it finds a cache to rebuild first (NeedsWrite),
        `query(True)` under the write lock. A reader never changes shared state."""
        with self._lock.read():
            try:
                return query(False)
            except NeedsWrite:
                pass
        with self._lock.write():
            return query(True)

    def _recommend_stateless(self, user_id: str, profile: str | None, history: Sequence[str],
                             q: queries.Query) -> list[Recommendation]:
        if isinstance(history, str):
            raise TypeError("history must be a sequence of item ids, not one string")
        for item_id in history:
            check_id(item_id, "history item_id")
        profile_vec = None if profile is None else self._encode([profile])[0]

        def answer(refresh: bool) -> list[Recommendation]:
            st = self._state
            if st is None or st.index is None:
                return []
            user = queries.history_user(st, history, profile, profile_vec)
            return queries.ranked(st, user, user_id, replace(q, now=int(time.time())), refresh)

        return self._read(answer)

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
        _check_k(k)
        flt, excluded = check_filter(filter), check_exclude(exclude)
        with self._lock.read():
            st = self._state
            row = None if st is None else st.items.live_row(item_id)
            if row is None:
                raise UnknownItemError(f"unknown item id {item_id!r}")
            return queries.similar(st, row, k, int(time.time()), flt, excluded)

    def get_item(self, item_id: str) -> Item:
        with self._lock.read():
            row = None if self._state is None else self._state.items.live_row(item_id)
            if row is None:
                raise UnknownItemError(f"unknown item id {item_id!r}")
            return self._state.items.item(row)

    def user_history(self, user_id: str) -> list[str]:
        """Item ids the user clicked, oldest first."""
        with self._lock.read():
            user = None if self._state is None else self._state.users.get(user_id)
            if user is None:
                raise UnknownUserError(f"unknown user id {user_id!r}")
            return [self._state.items.vocab.id(r) for r in user.clicks]

    def __contains__(self, item_id: object) -> bool:
        if not isinstance(item_id, str):
            return False
        with self._lock.read():
            return self._state is not None and self._state.items.live_row(item_id) is not None

    def stats(self) -> dict[str, Any]:
        """Counts, sizes and settings, for `kindling stats`."""
        with self._lock.read():
            st = self._state
            counts = self._counts()
            index = None if st is None else st.index
            return {
                "path": str(self.path), "generation": self._gen, **counts,
                "removed_items": counts["items"] - counts["live_items"],
                "events": 0 if st is None else st.events(),
                "index": None if index is None else {
                    "backend": index.backend, "kind": index.kind, "dim": index.dim, "vectors": index.ntotal,
                    "tombstones": index.ntotal - index.n_live},
                "model": self._model_meta(), "trained": st is not None and st.ranker.trained,
                "profile_weight": None if st is None else st.ranker.profile_weight,
                "online_steps": self._step_report(st),
                "pending_log_records": (self._log.next_seq if self._log else self._replayed_seq)
                - self._manifest.get("next_seq", 0),
                **({"replica": self.replica_lag()} if self._follower is not None else {}),
            }

    def replica_lag(self) -> dict[str, Any] | None:
        """A following replica's position (applied_seq, generation, behind_s, error, ...); else None."""
        return None if self._follower is None else self._follower.lag()

    def log_position(self) -> int:
        """The sequence number of the next log record: the writer has logged every record below
        it; a read-only engine (a replica) holds every record below it in its state.

        A replica that reaches the writer's position after a write shows that write
        (`kindling serve --workers` waits for it). One integer read, no lock.
        """
        log = self._log
        return log.next_seq if log is not None else self._replayed_seq

    # ---- the online step ----------------------------------------------------------------------
    def settle(self) -> int:
        """Take now, in this thread, the online steps still waiting for recorded clicks.

        `record` returns before its click's reranker step (the step worker takes it a few
        milliseconds later): a script that needs the next answer to reflect every click so far
        (an evaluation, a demo) calls this first. Returns the steps taken or found empty here.
        """
        n = 0
        while self._step_once():
            n += 1
        return n

    def _step_once(self) -> bool:
        """The oldest waiting click's step: its read and log record (State.next_step) under the
        read lock (the write lock when a cache needs a rebuild first), its SGD (State.learn)
        after it, holding only the step mutex, which keeps steps in order and which a save or a
        fit takes before the state is written or replaced. False when none waits."""
        if self._store.read_only:
            return False

        def read(refresh: bool) -> Any:
            self._step_mutex.acquire()  # the lock first, then the mutex: as _drain_steps under a save
            try:
                st, event_log = self._state, self._log
                if self._closed or st is None or event_log is None or not st.pending:
                    self._step_mutex.release()
                    return None
                return st, st.next_step(_log_writer(event_log), refresh)
            except BaseException:
                self._step_mutex.release()
                raise

        got = self._read(read)
        if got is None:
            return False
        time.sleep(0)  # the GIL to a writer the read held up, before the SGD (else up to 5 ms later)
        try:
            self._learn(*got)
        finally:
            self._step_mutex.release()
        return True

    def _learn(self, st: State, step: tuple[Any, Any]) -> None:
        """A step's SGD, after its read (`_step_once`, `_drain_steps`; the step mutex held)."""
        entry, plan = step
        st.learn(plan)
        self._step_lags.append(time.monotonic() - entry.queued)
        self._dirty = True

    def _drain_steps(self) -> None:
        """Every waiting step, now (the caller holds the write lock: a save, a fit, a close)."""
        with self._step_mutex:  # a step whose SGD runs now ends first
            st, event_log = self._state, self._log
            if st is None or event_log is None:
                return
            while st.pending:
                self._learn(st, st.next_step(_log_writer(event_log), refresh=True))

    def _drain_before_close(self) -> None:
        try:
            self._drain_steps()
        except Exception as exc:  # the clicks stay in the log, unstepped: the next open steps them
            log.warning("%s: the waiting online steps were not taken before close (%s)", self.path, _reason(exc))

    def _wake_stepper(self) -> None:
        st = self._state
        if st is None or not st.pending or self._store.read_only or self._closed:
            return
        if self._stepper is None:
            self._stepper = StepWorker(self._step_once, f"kindling-steps-{self.path.name}")
        self._stepper.wake()

    def _step_report(self, st: State | None) -> dict[str, Any]:
        """Clicks waiting for their step, and the lag from click to step over the last (at most
        1,024) steps this process took (ms: p50, p99, max)."""
        lags = np.array(list(self._step_lags), dtype=np.float64) * 1e3  # list(): one C-level copy
        out: dict[str, Any] = {"pending": 0 if st is None else len(st.pending), "lag_of_last": len(lags)}
        if len(lags):
            out.update(lag_ms_p50=round(float(np.percentile(lags, 50)), 3),
                       lag_ms_p99=round(float(np.percentile(lags, 99)), 3), lag_ms_max=round(float(lags.max()), 3))
        return out

    # ---- training ----------------------------------------------------------------------------
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
        self._check_writable()
        recs = [_event_record(e.user_id, e.item_id, e.event, e.value, e.timestamp) for e in events]
        with self._lock.write():
            self._require_items()
            self._drain_steps()  # the clicks before the fit step the model they were made on
            show = progress if progress is not None else sys.stderr.isatty()
            if not self.config.tune_steps:
                summary = fit_state(self._state, recs, show)
            else:
                summary = self._fit_tuned(recs, show)
            self._commit()  # (its save gives the training's temporaries back: _adopt)
        return summary

    def _fit_tuned(self, recs: list[EventRecord], show: bool) -> dict[str, Any]:
        """`fit` that first tunes the language model (Config.tune_steps) into the folder of the
        generation it saves; a failure leaves the store and the engine as they were."""
        if self._encoder is not None and not isinstance(getattr(self._encoder, "model_path", None), str):
            raise InvalidInputError("tune_steps > 0 tunes a sentence-transformers model; this engine was "
                                    "given another encoder (open it without one, or set tune_steps=0)")
        out = self._store.encoder_dir(self._gen + 1)
        request = TuneRequest(self.config.model_path or default_model_path(), out, self._make_encoder)
        try:
            summary = fit_state(self._state, recs, show, request)
        except BaseException:
            self._restore()  # the catalog may have been re-embedded half-way
            self._store.cleanup(self._manifest)
            raise
        if request.encoder is not None:
            self._tuned_dir, self._tuned_files, self._encoder = out, {}, request.encoder
        return summary


def _log_writer(event_log: EventLog) -> Callable[[Record], None]:
    """Appends a record to `event_log` without waiting for its fsync (a step record: see
    state/apply.py, "Deferred steps")."""
    return lambda rec: event_log.write([to_payload(rec)])


def _event_record(user_id: str, item_id: str, event: str, value: float, timestamp: int | None,
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


def _reason(exc: BaseException) -> str:
    """The short cause of an I/O failure, e.g. 'No space left on device'."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _query(k: int, exclude_seen: bool, candidates: Sequence[str] | None, exclude: Iterable[str] | None,
           flt: Filter | None, explain: bool, diversity: float) -> queries.Query:
    """A request's options, checked against their rules (the message names the rule broken)."""
    _check_k(k)
    if isinstance(diversity, bool) or not isinstance(diversity, (int, float)) or not 0.0 <= diversity <= 1.0:
        raise InvalidInputError(f"diversity must be a number between 0 and 1; got {diversity!r}")
    return queries.Query(k, exclude_seen, candidates, check_exclude(exclude), check_filter(flt), bool(explain),
                         float(diversity))


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > 10_000:
        raise InvalidInputError(f"k must be an integer between 1 and 10000; got {k!r}")


def _library_versions() -> dict[str, str]:
    import faiss
    import pyarrow

    return {"faiss": faiss.__version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__}


__all__ = ["Engine"]

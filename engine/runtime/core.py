"""The core of an open store: its directory, the snapshot in memory (State), the event log, the
lock, and the lifecycle that keeps memory and disk in agreement (load, replay, log, commit).

`Engine` (engine/engine.py) checks a call's arguments and delegates here; a read replica
(engine/replica.py) drives a read-only Core through the same public interface. Every mutation
reaches the state through `apply`: live (after its log record is written), on replay, and in a
replica.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..config import Config
from ..errors import ReadOnlyStoreError, StoreError
from ..locks import RWLock
from ..memory import release_free_memory
from ..serving.popular import NeedsWrite
from ..storage.eventlog import EventLog, LogSyncError, read_log
from ..storage.records import AddRecord, Record, from_payload, to_payload
from ..storage.store import FORMAT, FORMAT_VERSION, TUNED_FORMAT_VERSION, StoreDir
from ..text.encoder import TextEncoder
from ..version import __version__
from .encoders import EncoderHome
from .generation import map_saved_vectors, read_state, write_state
from .state import State
from .steps import Steps

log = logging.getLogger(__name__)


class Core:
    """One open store, in memory and on disk. Thread-safe through `lock` (a readers-writer lock):
    readers hold it to read `state`; a mutation holds it for writing while it logs and applies."""

    def __init__(self, store: StoreDir, config: Config, encoder: TextEncoder | None) -> None:
        self.store, self.config = store, config
        if config.blas_threads:  # process-wide, as Config.blas_threads says
            from ..threads import numpy_blas

            numpy_blas().limit(limits=config.blas_threads)
        self.encoders = EncoderHome(store, config, encoder)
        self.lock = RWLock()
        self.state: State | None = None
        self.log: EventLog | None = None
        self.generation = 0
        self.dirty = False
        #: The sequence number of the next record to apply: a read-only core (a replica) has no
        #: log of its own but counts what it replayed.
        self.replayed_seq = 0
        self.closed = False
        self.manifest: dict[str, Any] = {}
        self.milvus = None  # the MilvusHome of a writable store with index_backend "milvus"
        self.steps = Steps(self, f"kindling-steps-{store.path.name}")

    # ---- creating and loading -------------------------------------------------------------
    @classmethod
    def create(cls, store: StoreDir, config: Config, encoder: TextEncoder | None) -> "Core":
        """A new store's core, its first (empty) snapshot written."""
        core = cls(store, config, encoder)
        try:
            core.manifest = {"created_at": int(time.time())}
            if config.index_backend == "milvus":  # the store's collection names, fixed for good
                core.manifest["milvus"] = {"prefix": "kindling_" + secrets.token_hex(6), "collection": None}
            if encoder is not None:
                core.state = core.new_state(encoder.dim)
            core.commit(initial=True)
        except BaseException:
            core.release_milvus()
            raise
        return core

    @classmethod
    def load(cls, store: StoreDir, encoder: TextEncoder | None, tries: int = 5) -> "Core":
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
                    core = cls(store, Config.from_dict(manifest.get("config", {})), encoder)
                    try:
                        core._load(manifest, handles)
                    except BaseException:
                        core.release_milvus()
                        raise
                    return core
                finally:
                    for fh in handles.values():
                        fh.close()
            except (StoreError, FileNotFoundError):
                if (not store.read_only or attempt == tries - 1
                        or store.manifest_generation() == manifest.get("generation")):
                    raise
        raise AssertionError("unreachable")

    def _load(self, manifest: dict[str, Any], handles: dict[str, Any] | None = None) -> None:
        self.manifest, self.generation = manifest, int(manifest["generation"])
        self.encoders.use_tuned((manifest.get("model") or {}).get("tuned"), manifest.get("files", {}))
        d_text = manifest.get("model", {}).get("dim")
        handles = handles or {}
        if d_text:
            items, users, models, index_path, keys, ids = read_state(self.store, manifest, d_text, handles)
            self.state = self.new_state(int(d_text))
            self.state.milvus_collection = (manifest.get("milvus") or {}).get("collection")
            self.state.deferred_steps = manifest.get("online_steps") == "deferred"
            self.state.load(items, users, models, index_path,
                            None if index_path is None else handles.get(index_path.name),
                            self.store.file("models", self.generation, "safetensors"), keys, ids)
        log_fh = handles.get(manifest["log"])
        self._replay(self.store.path / manifest["log"], manifest["next_seq"],
                     None if log_fh is None or not self.store.read_only else log_fh.read())
        if not self.store.read_only:
            self.store.cleanup(manifest)
            if self.state is not None and self.state.reconcile_index():
                self.dirty = True
            self._drop_stale_collections(manifest)
            self.steps.wake()  # clicks whose step the log does not hold yet
        release_free_memory()  # the snapshot's Arrow tables and the build's temporaries

    def new_state(self, d_text: int) -> State:
        """An empty State; on a writable Milvus store, wired to the store's collection."""
        state = State(self.config, d_text)
        if self.config.index_backend == "milvus" and not self.store.read_only:
            if self.milvus is None:
                from ..serving.milvus import MilvusHome, resolve_uri
                self.milvus = MilvusHome(resolve_uri(self.config.milvus_uri, self.path),
                                         (self.manifest.get("milvus") or {}).get("prefix"))
            state.milvus = self.milvus
        return state

    def _milvus_meta(self) -> dict[str, Any] | None:
        """The manifest's record of the Milvus collection this snapshot's rows are in."""
        if self.milvus is None:
            return self.manifest.get("milvus")
        index = None if self.state is None else self.state.index
        return self.milvus.describe(getattr(index, "collection", None))

    def _drop_stale_collections(self, manifest: dict[str, Any]) -> None:
        """Drop the store's collections that neither the manifest nor memory uses (a crash or a
        failed save left them)."""
        if self.milvus is not None:
            index = None if self.state is None else self.state.index
            self.milvus.drop_others([(manifest.get("milvus") or {}).get("collection"),
                                     getattr(index, "collection", None)])

    def _replay(self, path: Path, next_seq: int, data: bytes | None = None) -> None:
        n = 0
        for seq, payload in read_log(path, repair=not self.store.read_only, first_seq=next_seq, data=data):
            self.apply(from_payload(payload, self.dim, f"{path}, record {seq}"))
            next_seq, n = seq + 1, n + 1
        if n:
            log.info("replayed %d logged mutations from %s", n, path.name)
            self.dirty = True
        self.replayed_seq = next_seq
        if not self.store.read_only:
            self.log = EventLog(path, next_seq, fsync=self.config.fsync)

    # ---- snapshots ----------------------------------------------------------------------------
    def commit(self, initial: bool = False, log_continues: bool = False) -> None:
        """Write the next generation and swap the manifest to it: all or nothing.

        On failure the half-written generation is deleted and the in-memory state is reloaded
        from the previous snapshot and the log, so memory never holds what the disk does not (an
        ingest or fit that could not be saved is undone). If the manifest was swapped but the
        directory fsync failed, the new generation is adopted (memory and disk agree) and the
        error is raised all the same: the save is not known to be durable.
        """
        gen = self.generation if initial else self.generation + 1
        manifest = None
        self.steps.drain()  # the snapshot holds every step its events call for
        if self.log is not None:
            try:  # the snapshot may hold only what the log already holds durably
                self.log.sync_all()
            except LogSyncError as exc:
                self.undo_unsynced(self.log)
                raise StoreError(f"{self.path}: the snapshot was not saved ({exc})") from exc
        try:
            manifest = self._write_snapshot(gen, log_continues)
            self.store.write_manifest(manifest)
        except Exception as exc:
            if manifest is not None and self.store.manifest_generation() == gen:
                self._adopt(manifest)
                raise StoreError(f"{self.path}: snapshot {gen} was written but is not known to be "
                                 f"durable ({reason(exc)})") from exc
            self.store.cleanup(self.manifest)
            if not initial:
                self.restore()
            raise StoreError(f"{self.path}: the snapshot was not saved and the previous one stands "
                             f"({reason(exc)})") from exc
        self._adopt(manifest)

    def _write_snapshot(self, gen: int, log_continues: bool = False) -> dict[str, Any]:
        """Write every file of generation `gen` (fsynced) and return its manifest, not yet swapped in.

        `log_continues`: the snapshot is exactly the previous one plus its log's records (a plain
        save, not an ingest or a fit), so a replica holding those may go on to the new log unreloaded.
        """
        paths = [] if self.state is None else write_state(self.store, gen, self.state)
        log_path = self.store.file("events", gen, "log")
        log_path.touch()
        files = self.store.describe(paths)
        files.update(self.encoders.manifest_files())
        tuned = self.encoders.tuned_dir is not None
        manifest = {
            "format": FORMAT, "kindling_version": __version__,
            "format_version": TUNED_FORMAT_VERSION if tuned else FORMAT_VERSION,
            "created_at": self.manifest.get("created_at", int(time.time())), "saved_at": int(time.time()),
            "generation": gen, "config": self.config.to_dict(), "libraries": _library_versions(),
            "model": self.encoders.meta(self.dim, self.manifest), "files": files, "log": log_path.name,
            "next_seq": self.log.next_seq if self.log else 0, "counts": self.counts(),
            "log_continues": log_continues, "online_steps": "deferred",
        }
        if self._milvus_meta() is not None:
            manifest["milvus"] = self._milvus_meta()
        return manifest

    def _adopt(self, manifest: dict[str, Any]) -> None:
        """Switch to the generation `manifest` names: its log takes the next records."""
        if self.log:
            self.log.close()
        self.log = EventLog(self.store.path / manifest["log"], manifest["next_seq"], fsync=self.config.fsync)
        self.manifest, self.generation, self.dirty = manifest, int(manifest["generation"]), False
        if self.state is not None:
            self.state.deferred_steps = True  # this generation's log is written that way
            try:  # one copy of the item vectors: the file just saved, mapped (storage/mapped.py)
                map_saved_vectors(self.store, manifest, self.state.items)
            except (StoreError, ValueError, OSError) as exc:
                log.warning("%s: the item vectors stay in memory (%s)", self.path, exc)
        self.store.cleanup(manifest)
        self._drop_stale_collections(manifest)
        if self.state is not None:
            self.state.ranker.popular.invalidate()  # a restart recomputes it: keep lists identical
        release_free_memory()  # the tables the snapshot was written from

    def restore(self) -> None:
        """Drop the in-memory state and reload the last snapshot plus the log (a failed commit)."""
        if self.log:
            self.log.close()
        self.log, self.state, self.dirty = None, None, False
        try:
            self._load(self.store.read_manifest())
        except BaseException:
            self.closed = True  # neither the old nor the new state is in memory: refuse to go on
            self.release_milvus()
            self.store.release()
            raise

    def close(self, save: bool) -> None:
        """Take the waiting steps, save when `save` and changed, release the store (the caller
        has stopped the threads that take the lock: the follower, the step worker)."""
        with self.lock.write():  # no mutation is half way through when the log closes
            if self.closed:
                return
            try:
                if not self.store.read_only:
                    try:
                        self.steps.drain()
                    except Exception as exc:  # the clicks stay in the log, unstepped: the next open steps them
                        log.warning("%s: the waiting online steps were not taken before close (%s)",
                                    self.path, reason(exc))
                if save and not self.store.read_only and self.dirty:
                    self.commit(log_continues=True)
            finally:
                if self.log:
                    self.log.close()
                self.release_milvus()
                self.store.release()
                self.closed = True

    def release_milvus(self) -> None:
        if self.milvus is not None:
            self.milvus.close()
            self.milvus = None

    # ---- what a replica moves ------------------------------------------------------------------
    def continue_to(self, manifest: dict[str, Any]) -> None:
        """A replica: the writer saved exactly what this core holds (`log_continues`); take its
        generation as ours, its log next. The caller holds the write lock."""
        self.manifest, self.generation = manifest, int(manifest["generation"])
        self.state.ranker.popular.invalidate()  # as the writer does on a save
        self.state.deferred_steps = manifest.get("online_steps") == "deferred"

    def swap_in(self, fresh: "Core") -> None:
        """A replica: serve `fresh` (a newer generation, loaded beside). The caller holds the
        write lock."""
        self.state, self.config, self.manifest = fresh.state, fresh.config, fresh.manifest
        self.generation, self.replayed_seq, self.dirty = fresh.generation, fresh.replayed_seq, False

    # ---- mutations ----------------------------------------------------------------------------
    def apply(self, rec: Record) -> None:
        """A logged record into the state (the store's first items make it)."""
        if self.state is None and isinstance(rec, AddRecord):
            self.state = self.new_state(rec.vectors.shape[1])
        self.state.apply(rec)
        self.dirty = True

    def log_and_apply(self, rec: Record) -> None:
        """Write-ahead: the record is durable in the log before the state changes. The caller
        holds the write lock."""
        try:
            self.log.append(to_payload(rec))
        except LogSyncError as exc:
            self.undo_unsynced(self.log)
            raise StoreError(f"{self.path}: the change was not recorded ({exc})") from exc
        self.apply(rec)

    def write_and_apply(self, recs: list[Record]) -> tuple[EventLog, tuple[int, int]]:
        """Write `recs` to the log (flushed, not yet fsynced) and apply them; the log and its
        ticket for `await_sync`. The caller holds the write lock."""
        event_log = self.log
        ticket = event_log.write([to_payload(r) for r in recs])
        for r in recs:
            self.apply(r)
        return event_log, ticket

    def await_sync(self, event_log: EventLog, ticket: tuple[int, int]) -> None:
        """Group commit: wait, outside the write lock, for the fsync that covers `ticket` (shared
        with the records of concurrent writers); on a failure undo what it did not cover."""
        try:
            event_log.sync(ticket)
        except LogSyncError as exc:
            with self.lock.write():
                self.undo_unsynced(event_log)
            raise StoreError(f"{self.path}: the event was not recorded ({exc})") from exc

    def undo_unsynced(self, event_log: EventLog) -> None:
        """After a failed fsync (write lock held): cut the records it did not cover off the log,
        and reload the state from the disk, so memory holds nothing the disk may not."""
        if event_log is self.log and event_log.rewind():
            self.restore()

    # ---- reading ------------------------------------------------------------------------------
    def read(self, query: Callable[[bool], Any]) -> Any:
        """`query(False)` under the read lock; if it finds a cache to rebuild first (NeedsWrite),
        `query(True)` under the write lock. A reader never changes shared state."""
        with self.lock.read():
            try:
                return query(False)
            except NeedsWrite:
                pass
        with self.lock.write():
            return query(True)

    @property
    def path(self) -> Path:
        return self.store.path

    @property
    def read_only(self) -> bool:
        return self.store.read_only

    @property
    def dim(self) -> int | None:
        """The store's text-vector width (None before the first item)."""
        return None if self.state is None else self.state.items.dim

    def check_writable(self) -> None:
        if self.closed:
            raise StoreError(f"{self.path}: the engine is closed")
        if self.store.read_only:
            raise ReadOnlyStoreError(f"{self.path}: opened read-only; writes go to the store's one writer "
                                     "(Engine.open without read_only)")

    def counts(self) -> dict[str, int]:
        if self.state is None:
            return {"items": 0, "live_items": 0, "users": 0}
        return self.state.counts()

    def log_position(self) -> int:
        """The sequence number of the next log record (see Engine.log_position)."""
        event_log = self.log
        return event_log.next_seq if event_log is not None else self.replayed_seq

    def stats(self) -> dict[str, Any]:
        """Counts, sizes and settings (the caller holds the read lock)."""
        st, counts = self.state, self.counts()
        index = None if st is None else st.index
        return {
            "path": str(self.path), "generation": self.generation, **counts,
            "removed_items": counts["items"] - counts["live_items"],
            "events": 0 if st is None else st.events(),
            "index": None if index is None else {
                "backend": index.backend, "kind": index.kind, "dim": index.dim, "vectors": index.ntotal,
                "tombstones": index.ntotal - index.n_live},
            "model": self.encoders.meta(self.dim, self.manifest), "trained": st is not None and st.ranker.trained,
            "profile_weight": None if st is None else st.ranker.profile_weight,
            "online_steps": self.steps.report(),
            "pending_log_records": self.log_position() - self.manifest.get("next_seq", 0),
        }


def reason(exc: BaseException) -> str:
    """The short cause of an I/O failure, e.g. 'No space left on device'."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _library_versions() -> dict[str, str]:
    import faiss
    import pyarrow

    return {"faiss": faiss.__version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__}


__all__ = ["Core", "reason"]

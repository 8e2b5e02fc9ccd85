"""The facade: create or open a store, add and remove items, recommend, record feedback, save.

Example:
    >>> from engine import Engine, Item
    >>> with Engine.create("my-store") as eng:                      # doctest: +SKIP
    ...     eng.add_items([Item("m1", "Toy Story (1995)", categories=("Animation", "Children"))])
    ...     eng.recommend("alice", k=5, profile="I love animated films for children")
"""

from __future__ import annotations

import base64
import logging
import math
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .catalog import check_text, item_text, validate_items
from .config import Config
from .encoder import Encoder, TextEncoder
from .errors import CorruptStoreError, InvalidInputError, StoreError, UnknownItemError, UnknownUserError
from .eventlog import EventLog, read_log
from .index import VectorIndex
from .items import ItemTable
from .locks import RWLock
from .projection import Projection
from .ranking import Ranker
from .snapshot import read_generation, write_generation
from .training import fit_reranker, fit_towers, holdout_users
from .store import FORMAT, FORMAT_VERSION, StoreDir
from .types import EVENT_KINDS, Event, Item, Recommendation
from .users import UserState, UserTable, apply_click, apply_skip, normalise, rederive
from .vocab import check_id

log = logging.getLogger(__name__)


def _b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a, np.float32).tobytes()).decode("ascii")


def _unb64(s: str, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(s), np.float32).reshape(-1, dim).copy()


class Engine:
    """A Kindling store, open for reading and (unless read_only) writing. Thread-safe."""

    def __init__(self, store: StoreDir, config: Config, encoder: TextEncoder | None) -> None:
        self._store, self.config = store, config
        self._encoder = encoder
        self._lock = RWLock()
        self._items: ItemTable | None = None
        self._users: UserTable | None = None
        self._proj: Projection | None = None
        self._index: VectorIndex | None = None
        self._ranker = Ranker(config)
        self._log: EventLog | None = None
        self._gen = 0
        self._dirty = False
        self._replayed_seq = 0
        self._closed = False
        self._manifest: dict[str, Any] = {}

    # ---- lifecycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, config: Config | None = None,
               encoder: TextEncoder | None = None) -> "Engine":
        """Make a new store at `path` (absent or an empty directory)."""
        store = StoreDir(path, create=True)
        try:
            eng = cls(store, config or Config(), encoder)
            eng._manifest = {"created_at": int(time.time())}
            if encoder is not None:
                eng._init_state(encoder.dim)
            eng._commit(initial=True)
        except BaseException:
            store.release()
            raise
        return eng

    @classmethod
    def open(cls, path: str | Path, encoder: TextEncoder | None = None, read_only: bool = False) -> "Engine":
        """Open an existing store: load the last snapshot and replay the event log after it."""
        store = StoreDir(path, read_only=read_only)
        try:
            return cls._open_snapshot(store, encoder)
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
                    eng._load(manifest, handles)
                    return eng
                finally:
                    for fh in handles.values():
                        fh.close()
            except (StoreError, FileNotFoundError):
                if (not store.read_only or attempt == tries - 1
                        or store.manifest_generation() == manifest.get("generation")):
                    raise
        raise AssertionError("unreachable")

    def _init_state(self, d_text: int) -> None:
        self._items = ItemTable(d_text)
        self._proj = Projection(d_text)
        self._users = UserTable(self._proj.d_out)

    def _load(self, manifest: dict[str, Any], handles: dict[str, Any] | None = None) -> None:
        self._manifest, self._gen = manifest, int(manifest["generation"])
        d_text = manifest.get("model", {}).get("dim")
        if d_text:
            self._init_state(int(d_text))
            self._items, self._users, models, index_path = read_generation(self._store, manifest, d_text, handles)
            try:
                self._proj = self._ranker.load_models(models, d_text)
            except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
                raise CorruptStoreError(f"{self._store.file('models', self._gen, 'safetensors')}: does not "
                                        f"hold the models this store needs ({exc})") from exc
            if index_path is not None:
                self._index = self._new_index(self._index_kind(len(self._items)), self._ranker.index_dim)
                self._index.load(index_path, self._items.live_rows(), len(self._items),
                                 (handles or {}).get(index_path.name))
            self._ranker.refresh_item_vectors(self._items, self._proj)
            self._ranker.rebuild_coclicks(self._users)
            self._check_models(models)
        log_fh = (handles or {}).get(manifest["log"])
        self._replay(self._store.path / manifest["log"], manifest["next_seq"],
                     None if log_fh is None or not self._store.read_only else log_fh.read())
        if not self._store.read_only:
            self._store.cleanup(manifest)

    def _check_models(self, models: dict[str, np.ndarray]) -> None:
        """What the loaded models would save again must be in the file, shaped alike: a tensor a
        loader skipped would otherwise leave a default-initialised model, silently."""
        if not models:
            return
        aside = ("rerank.", "replay.") if self._ranker.reranker.set_aside else ()
        bad = [k for k, v in self._ranker.model_tensors(self._proj).items()
               if not k.startswith(aside) and (k not in models or models[k].shape != np.shape(v))]
        if bad:
            raise CorruptStoreError(f"{self._store.file('models', self._gen, 'safetensors')}: missing or "
                                    f"misshapen tensor(s) {', '.join(sorted(bad)[:5])}")

    def _replay(self, path: Path, next_seq: int, data: bytes | None = None) -> None:
        n = 0
        for seq, rec in read_log(path, repair=not self._store.read_only, first_seq=next_seq, data=data):
            self._apply(rec)
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
            self._commit()

    def _commit(self, initial: bool = False) -> None:
        """Write the next generation and swap the manifest to it: all or nothing.

        On failure the half-written generation is deleted and the in-memory state is reloaded
        from the previous snapshot and the log, so memory never holds what the disk does not (an
        ingest or fit that could not be saved is undone). If the manifest was swapped but the
        directory fsync failed, the new generation is adopted (memory and disk agree) and the
        error is raised all the same: the save is not known to be durable.
        """
        gen = self._gen if initial else self._gen + 1
        manifest = None
        try:
            manifest = self._write_snapshot(gen)
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

    def _write_snapshot(self, gen: int) -> dict[str, Any]:
        """Write every file of generation `gen` (fsynced) and return its manifest, not yet swapped in."""
        paths = []
        if self._items is not None:
            paths = write_generation(self._store, gen, self._items, self._users,
                                     self._ranker.model_tensors(self._proj), self._index)
        log_path = self._store.file("events", gen, "log")
        log_path.touch()
        next_seq = self._log.next_seq if self._log else 0
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "kindling_version": __version__,
            "created_at": self._manifest.get("created_at", int(time.time())), "saved_at": int(time.time()),
            "generation": gen, "config": self.config.to_dict(), "libraries": _library_versions(),
            "model": self._model_meta(), "files": self._store.describe(paths), "log": log_path.name,
            "next_seq": next_seq, "counts": self._counts(),
        }

    def _adopt(self, manifest: dict[str, Any]) -> None:
        """Switch to the generation `manifest` names: its log takes the next records."""
        if self._log:
            self._log.close()
        self._log = EventLog(self._store.path / manifest["log"], manifest["next_seq"], fsync=self.config.fsync)
        self._manifest, self._gen, self._dirty = manifest, int(manifest["generation"]), False
        self._store.cleanup(manifest)
        self._ranker.invalidate_popular()  # a restart recomputes it: keep lists identical

    def _restore(self) -> None:
        """Drop the in-memory state and reload the last snapshot plus the log (a failed commit)."""
        if self._log:
            self._log.close()
        self._log, self._items, self._users, self._proj, self._index = None, None, None, None, None
        self._ranker, self._dirty = Ranker(self.config), False
        try:
            self._load(self._store.read_manifest())
        except BaseException:
            self._closed = True  # neither the old nor the new state is in memory: refuse to go on
            self._store.release()
            raise

    def close(self, save: bool = True) -> None:
        """Release the store, saving a snapshot first when writable, changed and `save` is true.

        With save=False acknowledged mutations stay in the event log and are replayed on open.
        """
        if self._closed:
            return
        try:
            if save and not self._store.read_only and self._dirty:
                self.save()
        finally:
            if self._log:
                self._log.close()
            self._store.release()
            self._closed = True

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
        """The language model, loaded on first use."""
        if self._encoder is None:
            self._encoder = Encoder(self.config.model_path, batch_size=self.config.batch_size,
                                    show_progress=False, backend=self.config.encoder_backend)
        return self._encoder

    def _model_meta(self) -> dict[str, Any]:
        if self._items is None:
            return {"path": self.config.model_path, "dim": None}
        return {"path": self.config.model_path, "dim": self._items.dim,
                "name": getattr(self._encoder, "name", self._manifest.get("model", {}).get("name"))}

    def _counts(self) -> dict[str, int]:
        if self._items is None:
            return {"items": 0, "live_items": 0, "users": 0}
        return {"items": len(self._items), "live_items": int(len(self._items.live_rows())),
                "users": len(self._users)}

    def _check_writable(self) -> None:
        if self._closed:
            raise StoreError(f"{self.path}: the engine is closed")
        if self._store.read_only:
            raise StoreError(f"{self.path}: opened read-only")

    def _index_kind(self, n: int) -> str:
        if self.config.index != "auto":
            return self.config.index
        return "flat" if n < self.config.exact_threshold else "hnsw"

    def _new_index(self, kind: str, dim: int) -> VectorIndex:
        c = self.config
        return VectorIndex(dim, kind, hnsw_m=c.hnsw_m, ef_construction=c.hnsw_ef_construction,
                           ef_search=c.hnsw_ef_search, nlist=c.ivf_nlist, nprobe=c.ivf_nprobe,
                           search_threads=c.search_threads)

    def _rebuild_index(self) -> None:
        """Rebuild FAISS from the live rows (compaction, a kind change, or a new projection)."""
        rows = self._items.live_rows()
        self._index = self._new_index(self._index_kind(len(rows)), self._ranker.index_dim)
        self._index.build(rows, self._ranker.index_vectors(rows))

    def _encode(self, texts: Sequence[str]) -> np.ndarray:
        vecs = np.asarray(self.encoder.encode(list(texts)), dtype=np.float32)
        if vecs.ndim != 2 or len(vecs) != len(texts):  # checked before anything is logged
            raise InvalidInputError(f"the encoder must return shape (n, dim) for n texts; got {vecs.shape} "
                                    f"for {len(texts)} texts")
        if self._items is not None and vecs.shape[1] != self._items.dim:
            raise InvalidInputError(f"the encoder gives {vecs.shape[1]}-d vectors but this store holds "
                                    f"{self._items.dim}-d ones; use the store's model")
        if not np.isfinite(vecs).all():
            raise InvalidInputError("the encoder returned NaN or inf; refusing to index it")
        return vecs

    # ---- mutations (validated, logged, then applied) -----------------------------------------
    def add_items(self, items: Iterable[Item | dict[str, Any]], vectors: np.ndarray | None = None,
                  upsert: bool = False) -> int:
        """Embed and index new items; they are recommendable when this returns.

        Args:
            items: Item objects or dicts with item_id, title, text, categories.
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
            rec = {"op": "add", "t": int(time.time()), "dim": vecs.shape[1], "vec": _b64(vecs),
                   "items": [[i.item_id, i.title, i.text, list(i.categories)] for i in batch]}
            self._log.append(rec)
            self._apply(rec, vecs)
        return len(batch)

    def ingest(self, items: Iterable[Item | dict[str, Any]], upsert: bool = False,
               progress: bool | None = None) -> int:
        """Add a large batch atomically: embed all (with a progress bar), apply, save a snapshot.

        Nothing is half-ingested: a bad row or a crash before the snapshot's manifest is swapped
        leaves the store as it was.
        """
        self._check_writable()
        batch = validate_items(items)
        if not batch:
            return 0
        with self._lock.write():
            self._check_duplicates(batch, upsert)
        vecs = self._encode_many([item_text(i) for i in batch], progress)
        with self._lock.write():
            self._check_duplicates(batch, upsert)
            rec = {"t": int(time.time()), "items": [[i.item_id, i.title, i.text, list(i.categories)] for i in batch]}
            self._apply_add(rec, vecs)
            self._commit()
        return len(batch)

    def _encode_many(self, texts: list[str], progress: bool | None, chunk: int = 512) -> np.ndarray:
        from tqdm.auto import tqdm

        show = progress if progress is not None else (len(texts) > chunk and sys.stderr.isatty())
        parts = []
        with tqdm(total=len(texts), desc="embedding", unit="item", disable=not show) as bar:
            for start in range(0, len(texts), chunk):
                parts.append(self._encode(texts[start:start + chunk]))
                bar.update(len(parts[-1]))
        return np.concatenate(parts) if parts else np.zeros((0, self.encoder.dim), np.float32)

    def _check_duplicates(self, batch: list[Item], upsert: bool) -> None:
        if upsert or self._items is None:
            return
        dup = [i.item_id for i in batch if self._items.live_row(i.item_id) is not None]
        if dup:
            raise InvalidInputError(f"{len(dup)} item id(s) already in the store (e.g. {dup[0]!r}); "
                                    "ids must be new unless upsert=True")

    def _batch_vectors(self, batch: list[Item], vectors: np.ndarray | None) -> np.ndarray:
        if vectors is None:
            return self._encode([item_text(i) for i in batch])
        from .index import check_vectors

        dim = self._items.dim if self._items is not None else self.encoder.dim
        vecs = check_vectors(vectors, dim)
        if len(vecs) != len(batch):
            raise InvalidInputError(f"got {len(vecs)} vectors for {len(batch)} items")
        return normalise_rows_checked(vecs)

    def remove_items(self, item_ids: Iterable[str]) -> int:
        """Remove items; no later search returns them. Unknown ids raise UnknownItemError."""
        self._check_writable()
        ids = list(dict.fromkeys(check_id(i, "item_id") for i in item_ids))
        with self._lock.write():
            missing = [i for i in ids if self._items is None or self._items.live_row(i) is None]
            if missing:
                raise UnknownItemError(f"unknown item id(s): {', '.join(map(repr, missing[:5]))}; nothing removed")
            if ids:
                rec = {"op": "remove", "ids": ids}
                self._log.append(rec)
                self._apply(rec)
        return len(ids)

    def record(self, user_id: str, item_id: str, event: str = "click", value: float = 1.0,
               timestamp: int | None = None) -> None:
        """Log one click, skip or impression durably, then learn from it at once."""
        self._check_writable()
        rec = self._event_record(user_id, item_id, event, value, timestamp)
        with self._lock.write():
            if self._items is None or self._items.live_row(item_id) is None:
                raise UnknownItemError(f"unknown item id {item_id!r}")
            self._log.append(rec)
            self._apply(rec)

    @staticmethod
    def _event_record(user_id: str, item_id: str, event: str, value: float,
                      timestamp: int | None) -> dict[str, Any]:
        check_id(user_id, "user_id")
        check_id(item_id, "item_id")
        if event not in EVENT_KINDS:
            raise InvalidInputError(f"event must be one of {', '.join(EVENT_KINDS)}; got {event!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InvalidInputError(f"value must be a finite number; got {value!r}")
        if timestamp is not None and (isinstance(timestamp, bool) or not isinstance(timestamp, int)):
            raise InvalidInputError(f"timestamp must be an int (unix seconds); got {timestamp!r}")
        t = int(time.time()) if timestamp is None else timestamp
        return {"op": "event", "u": user_id, "i": item_id, "e": event, "v": float(value), "t": t}

    def set_profile(self, user_id: str, profile: str) -> None:
        """Give a user a profile text (its vector seeds the user, weighing like one click)."""
        self._check_writable()
        check_id(user_id, "user_id")
        check_text(profile, "profile")
        with self._lock.write():
            self._require_items()
            vec = self._encode([profile])[0]
            rec = {"op": "profile", "u": user_id, "text": profile, "vec": _b64(vec)}
            self._log.append(rec)
            self._apply(rec)

    def _require_items(self) -> None:
        if self._items is None or not len(self._items):
            raise InvalidInputError("the store holds no items yet; add items first")

    # ---- applying logged mutations (live and on replay) --------------------------------------
    def _apply(self, rec: dict[str, Any], vecs: np.ndarray | None = None) -> None:
        op = rec["op"]
        if op == "add":
            if vecs is None:
                vecs = _unb64(rec["vec"], rec["dim"])
            self._apply_add(rec, vecs)
        elif op == "remove":
            self._apply_remove(rec["ids"])
        elif op == "event":
            self._apply_event(rec)
        elif op == "profile":
            self._apply_profile(rec["u"], rec["text"], _unb64(rec["vec"], len(rec["vec"]) and self._items.dim)[0])
        self._dirty = True

    def _apply_add(self, rec: dict[str, Any], vecs: np.ndarray) -> None:
        if self._items is None:
            self._init_state(vecs.shape[1])
        rows = np.array([self._items.append(Item(i, t, x, tuple(c)), vecs[j], rec["t"])
                         for j, (i, t, x, c) in enumerate(rec["items"])], dtype=np.int64)
        self._ranker.on_items_added(self._items, self._proj, rows)
        # An upserted or revived row still has its old vector in FAISS under the same id: rebuild.
        replaced = self._index is not None and bool(self._index.holds(rows).any())
        need_kind = self._index_kind(len(self._items.live_rows()))
        if self._index is None or replaced or self._index.kind != need_kind or self._index.ntotal == 0:
            self._rebuild_index()
        else:
            self._index.add(rows, self._ranker.index_vectors(rows))

    def _apply_remove(self, ids: list[str]) -> None:
        rows = np.array([self._items.vocab.row(i) for i in ids], dtype=np.int64)
        self._items.removed[rows] = True
        self._index.remove(rows)
        self._ranker.on_items_removed(rows)
        if self._index.tombstone_ratio() > self.config.compact_ratio and len(self._items.live_rows()):
            self._rebuild_index()

    def _apply_event(self, rec: dict[str, Any]) -> None:
        row = self._items.vocab.row(rec["i"])
        user = self._users.get_or_create(rec["u"])
        self._ranker.on_event(user, row, rec["e"], rec["v"], rec["t"], self._items,
                              learn=self.config.online_updates, index=self._index)
        if rec["e"] == "click":
            user.clicks.append(row)
        elif rec["e"] == "skip":
            user.skips.append(row)
        else:
            user.impressions += 1
        user._seen = None

    def _apply_profile(self, user_id: str, text: str, vec: np.ndarray) -> None:
        user = self._users.get_or_create(user_id)
        user.profile, user.profile_vec = text, vec
        self._rederive(user)

    def _rederive(self, user: UserState) -> None:
        rows = np.array(user.clicks + user.skips, dtype=np.int64)
        item_vecs = self._ranker.item_vectors(rows)
        prof = None if user.profile_vec is None else self._proj.transform(user.profile_vec[None])[0]
        rederive(user, item_vecs, prof, self.config.user_min_step, self.config.skip_step)

    # ---- queries -----------------------------------------------------------------------------
    def recommend(self, user_id: str, k: int = 10, profile: str | None = None, exclude_seen: bool = True,
                  candidates: Sequence[str] | None = None, exclude: Iterable[str] | None = None,
                  history: Sequence[str] | None = None) -> list[Recommendation]:
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

        Raises:
            UnknownItemError: an id in `history` is not a live item.
        """
        check_id(user_id, "user_id")
        _check_k(k)
        if profile is not None:
            check_text(profile, "profile")
        if history is not None:
            return self._recommend_stateless(user_id, k, profile, exclude_seen, candidates, exclude, history)
        if profile is not None and not self._store.read_only:
            user = self._users.get(user_id) if self._users is not None else None
            if user is None or user.profile != profile:
                self.set_profile(user_id, profile)
        with self._lock.read():
            if self._items is None or self._index is None:
                return []
            user = self._users.get(user_id)
            if user is None:
                user = UserState(vector=np.zeros(self._proj.d_out, np.float32))
                if profile is not None:  # read-only store: use the profile without saving it
                    user.profile, user.profile_vec = profile, self._encode([profile])[0]
                    user.vector = self._proj.transform(user.profile_vec[None])[0]
            return self._rank_for(user, user_id, k, exclude_seen, candidates, exclude)

    def _recommend_stateless(self, user_id: str, k: int, profile: str | None, exclude_seen: bool,
                             candidates: Sequence[str] | None, exclude: Iterable[str] | None,
                             history: Sequence[str]) -> list[Recommendation]:
        if isinstance(history, str):
            raise TypeError("history must be a sequence of item ids, not one string")
        for item_id in history:
            check_id(item_id, "history item_id")
        profile_vec = None if profile is None else self._encode([profile])[0]
        with self._lock.read():
            if self._items is None or self._index is None:
                return []
            rows = []
            for item_id in history:
                row = self._items.live_row(item_id)
                if row is None:
                    raise UnknownItemError(f"history names item {item_id!r}, which is not a live item")
                rows.append(row)
            user = self._ranker.transient_user(rows, profile, profile_vec)
            return self._rank_for(user, user_id, k, exclude_seen, candidates, exclude)

    def _rank_for(self, user: UserState, user_id: str, k: int, exclude_seen: bool,
                  candidates: Sequence[str] | None, exclude: Iterable[str] | None) -> list[Recommendation]:
        """The ranked list for a user state (the read lock held by the caller)."""
        banned = self._banned(user, exclude_seen, exclude)
        cand_rows = None if candidates is None else self._candidate_rows(candidates, banned)
        rows, scores = self._ranker.rank(user, self._items, self._index, k, banned, cand_rows, user_key=user_id)
        return [Recommendation(self._items.vocab.id(r), float(s), self._items.titles[r])
                for r, s in zip(rows, scores)]

    def _banned(self, user: UserState, exclude_seen: bool, exclude: Iterable[str] | None) -> np.ndarray:
        rows = set(user.seen()) if exclude_seen else set()
        for i in exclude or ():
            r = self._items.vocab.row(i)
            if r is not None:
                rows.add(r)
        return np.fromiter(rows, dtype=np.int64, count=len(rows))

    def _candidate_rows(self, candidates: Sequence[str], banned: np.ndarray) -> np.ndarray:
        rows = [self._items.live_row(i) for i in candidates]
        arr = np.array([r for r in rows if r is not None], dtype=np.int64)
        return np.setdiff1d(arr, banned) if len(banned) else np.unique(arr)

    def similar_items(self, item_id: str, k: int = 10) -> list[Recommendation]:
        """The k live items closest to `item_id` in retrieval space (itself excluded)."""
        check_id(item_id, "item_id")
        _check_k(k)
        with self._lock.read():
            row = None if self._items is None else self._items.live_row(item_id)
            if row is None:
                raise UnknownItemError(f"unknown item id {item_id!r}")
            q = self._ranker.similar_query(row)
            rows, scores = self._index.search(q, k, exclude=np.array([row], np.int64))
            return [Recommendation(self._items.vocab.id(r), float(s), self._items.titles[r])
                    for r, s in zip(rows, scores)]

    def get_item(self, item_id: str) -> Item:
        with self._lock.read():
            row = None if self._items is None else self._items.live_row(item_id)
            if row is None:
                raise UnknownItemError(f"unknown item id {item_id!r}")
            return self._items.item(row)

    def user_history(self, user_id: str) -> list[str]:
        """Item ids the user clicked, oldest first."""
        with self._lock.read():
            user = None if self._users is None else self._users.get(user_id)
            if user is None:
                raise UnknownUserError(f"unknown user id {user_id!r}")
            return [self._items.vocab.id(r) for r in user.clicks]

    def __contains__(self, item_id: object) -> bool:
        return isinstance(item_id, str) and self._items is not None and self._items.live_row(item_id) is not None

    def stats(self) -> dict[str, Any]:
        """Counts, sizes and settings, for `kindling stats`."""
        with self._lock.read():
            counts = self._counts()
            # Counted per user: item statistics count a click as an impression too (and stay
            # untouched when online_updates is off), so their sum is not the number of events.
            events = 0 if self._users is None else sum(
                len(u.clicks) + len(u.skips) + u.impressions for u in self._users.states)
            return {
                "path": str(self.path), "generation": self._gen, **counts,
                "removed_items": counts["items"] - counts["live_items"], "events": events,
                "index": None if self._index is None else {
                    "kind": self._index.kind, "dim": self._index.dim, "vectors": self._index.ntotal,
                    "tombstones": self._index.ntotal - self._index.n_live},
                "model": self._model_meta(), "trained": self._ranker.trained,
                "pending_log_records": (self._log.next_seq if self._log else self._replayed_seq)
                - self._manifest.get("next_seq", 0),
            }

    # ---- training ----------------------------------------------------------------------------
    def fit(self, events: Iterable[Event], progress: bool | None = None) -> dict[str, Any]:
        """Learn from logged events, absorb them into users and item statistics, and save.

        Returns:
            A summary of what was trained (epochs, losses, counts).
        """
        self._check_writable()
        evs = [self._event_record(e.user_id, e.item_id, e.event, e.value, e.timestamp) for e in events]
        with self._lock.write():
            self._require_items()
            evs = [r for r in evs if self._items.live_row(r["i"]) is not None]
            for rec in evs:
                self._apply_event_quiet(rec)
            show = progress if progress is not None else sys.stderr.isatty()
            holdout = holdout_users(self._users, self.config)
            summary = {"events": len(evs), "reranker_users": len(holdout),
                       **fit_towers(self._ranker, self._items, self._users, show, holdout)}
            if summary["projection"]:
                self._proj = self._ranker.projection
                self._ranker.refresh_item_vectors(self._items, self._proj)
                self._users.dim = self._proj.d_out
                self._rebuild_index()
                for user in self._users.states:
                    self._rederive(user)
            # the reranker learns on users whose clicks are in no co-click count it sees, as a new
            # user's are not; the counts of every user come back for serving
            self._ranker.rebuild_coclicks(self._users, skip=holdout)
            summary.update(fit_reranker(self._ranker, self._items, self._users, self._index, show, holdout))
            self._ranker.rebuild_coclicks(self._users)
            self._commit()
        return summary

    def _apply_event_quiet(self, rec: dict[str, Any]) -> None:
        """Absorb a logged event without the per-event SGD step (fit trains in batch instead)."""
        row = self._items.vocab.row(rec["i"])
        user = self._users.get_or_create(rec["u"])
        self._ranker.on_event(user, row, rec["e"], rec["v"], rec["t"], self._items, learn=True, sgd=False)
        if rec["e"] == "click":
            user.clicks.append(row)
        elif rec["e"] == "skip":
            user.skips.append(row)
        else:
            user.impressions += 1
        user._seen = None


def normalise_rows_checked(vecs: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vecs, axis=1)
    if (norms < 1e-12).any():
        raise InvalidInputError("vectors must not be all zeros")
    return (vecs / norms[:, None]).astype(np.float32)


def _reason(exc: BaseException) -> str:
    """The short cause of an I/O failure, e.g. 'No space left on device'."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _check_k(k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k > 10_000:
        raise InvalidInputError(f"k must be an integer between 1 and 10000; got {k!r}")


def _library_versions() -> dict[str, str]:
    import faiss
    import pyarrow

    return {"faiss": faiss.__version__, "numpy": np.__version__, "pyarrow": pyarrow.__version__}


__all__ = ["Engine", "normalise"]

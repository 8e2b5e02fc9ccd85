"""The engine's in-memory state and the one path every logged mutation takes into it.

`State.apply` is called for a record as it is acknowledged (`Engine.record`, `add_items`, ...) and
for the same record when the log is replayed on open, so the live path and recovery cannot drift
apart. An event changes the state in this order (`apply_event`):

1. the reranker's online step (a click on one of the user's candidates, when the reranker is
   trained and `online_lr > 0`): it learns from the candidates the user had *before* this click
   moved anything; queued here and taken later ("Deferred steps" below), or, replaying a log
   from before them, taken inside the event;
2. co-click counts: the click pairs with the user's previous clicks (the history before it);
3. the user's vector (`users.apply_click` / `apply_skip` / `apply_dislike`, a strong skip), with
   a step set by the history length before the event;
4. the item's counts (clicks, skips, impressions);
5. the user's history, last, because steps 2 and 3 read the history as it was before the event
   (a dislike goes to `UserState.dislikes`: hidden from the user for good);
6. the event's identity, so that `import_events` skips it later, and its caller-given id (when it
   has one), so that `record(..., event_id=)` and a stream consumer apply it once.

Deferred steps. Step 1 is not taken inside the event: the click joins `State.pending` with a copy
of its user as they stood before it, and the engine's step worker takes the step moments later
(`State.next_step`, off the `record` path), writing a `StepRecord` to the log at the point where it
read the state. Replay (recovery, a replica) applies that record at the same point, and so takes
the same step from the same state: the same weights. `pending` is bounded
(`Config.online_queue`, the oldest dropped untaken), and since every step the worker takes or
finds empty is written, replay holds exactly the live queue at every point of the log; the clicks
still pending when a process died are stepped after the open. A log from before deferred steps
(`State.deferred_steps` false: its manifest does not say "online_steps": "deferred") replays with
the step inside the event, as it was written.

With `Config.online_updates=False` the store is frozen: a recorded click or skip only marks the
item as seen (`UserState.held`, which no vector, count or co-click is ever derived from, so
nothing moves on reopen either); an impression is only logged. Imported events (history, not
live feedback) always take steps 2-6; the online step (1) is training, which `fit` does in batch.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, replace
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import Config
from ..errors import CorruptStoreError
from ..memory import release_free_memory
from ..models.projection import Projection
from ..models.rerank import ANCHOR, GATE, STEPS
from ..serving.backend import VectorBackend
from ..serving.index import VectorIndex
from ..serving.ranking import PROFILE_WEIGHT_TENSOR, Ranker
from ..state.coclick import CoClicks
from ..state.items import ItemTable
from ..state.lexical import Lexicon
from ..text.catalog import item_text
from ..storage.records import (
    AddRecord, EventRecord, ImportRecord, ProfileRecord, Record, RemoveRecord, StepRecord, id_key,
)
from ..state.users import UserState, UserTable, apply_click, apply_dislike, apply_skip, rederive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PendingStep:
    """A click waiting for its online step: the event's key, the clicked row, the user as they
    stood before the click (lists copied: later events do not reach it), and when it was queued
    (time.monotonic(), for the lag the engine reports)."""

    key: int
    row: int
    user: UserState
    queued: float


def before_click(user: UserState) -> UserState:
    """A copy of `user` that later events leave alone (vectors are replaced, never changed in place)."""
    return replace(user, clicks=list(user.clicks), skips=list(user.skips), held=list(user.held),
                   dislikes=list(user.dislikes))


class State:
    """Items, users, the item tower, the index and the ranker of one store, in memory."""

    def __init__(self, config: Config, d_text: int) -> None:
        self.config = config
        self.items = ItemTable(d_text)
        self.proj = Projection(d_text)
        self.users = UserTable(self.proj.d_out)
        self.coclicks = CoClicks()  # co-click counts of the stored histories
        self.lexicon = Lexicon()    # TF-IDF rows of the item texts
        self.ranker = Ranker(config, self.coclicks, self.lexicon)
        self._index: VectorBackend | None = None
        #: With index_backend "milvus" on a writable store: the store's milvus.MilvusHome, and the
        #: collection the loaded snapshot names. None otherwise (a read-only open of a Milvus
        #: store serves from an exact FAISS index of the snapshot's rows: Milvus Lite allows one
        #: process per file, and the collection may be ahead of the snapshot the reader sees).
        self.milvus = None
        self.milvus_collection: str | None = None
        self.event_keys: set[int] = set()  # identities of every event applied (see EventRecord.key)
        self.event_ids: set[int] = set()  # caller-given event ids applied, hashed (records.id_key)
        #: Clicks waiting for their online step, oldest first (see "Deferred steps" above).
        self.pending: deque[PendingStep] = deque(maxlen=config.online_queue)
        #: False while replaying a log written before deferred steps (the step inside the event).
        self.deferred_steps = True

    @property
    def index(self) -> VectorBackend | None:
        return self._index

    @index.setter
    def index(self, index: VectorBackend | None) -> None:
        self._index = self.ranker.index = index  # the ranker reads item vectors from its copy

    # ---- the index policy --------------------------------------------------------------------
    def index_kind(self, n: int) -> str:
        """The index kind for n live items: the configured one, or exact below `exact_threshold`."""
        if self.config.index != "auto":
            return self.config.index
        return "flat" if n < self.config.exact_threshold else "hnsw"

    def new_index(self, kind: str) -> VectorBackend:
        c = self.config
        if self.milvus is not None:
            from ..serving.milvus import MilvusIndex
            return MilvusIndex(self.milvus, self.ranker.space.index_dim, kind, hnsw_m=c.hnsw_m,
                               ef_construction=c.hnsw_ef_construction, ef_search=c.hnsw_ef_search,
                               nlist=c.ivf_nlist, nprobe=c.ivf_nprobe)
        return VectorIndex(self.ranker.space.index_dim, kind, hnsw_m=c.hnsw_m, ef_construction=c.hnsw_ef_construction,
                           ef_search=c.hnsw_ef_search, nlist=c.ivf_nlist, nprobe=c.ivf_nprobe,
                           search_threads=c.search_threads)

    def rebuild_index(self) -> None:
        """Rebuild the index from the live rows (compaction, a kind change, or a new projection)."""
        rows = self.items.live_rows()
        self.index = self.new_index(self.index_kind(len(rows)))
        self.index.build(rows, self.ranker.space.index_vectors(rows))
        self.items.release_vector_pages()
        release_free_memory()

    def load(self, items: ItemTable, users: UserTable, models: dict[str, np.ndarray] | None,
             index_path: Path | None, index_fh: Any, models_path: Path, event_keys: np.ndarray,
             event_ids: np.ndarray | None = None) -> None:
        """Install a snapshot's parts (see snapshot.read_generation)."""
        self.items, self.users = items, users
        try:
            self.proj = self.ranker.load_models(models or {}, items.dim)
        except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise CorruptStoreError(f"{models_path}: does not hold the models this store needs ({exc})") from exc
        if index_path is not None:
            self.index = self.new_index(self.index_kind(len(items)))
            self.index.load(index_path, items.live_rows(), len(items), index_fh)
        self.refresh_space()
        if index_path is not None:
            self.vouch_for_index(index_path)
        if self.config.index_backend == "milvus" and len(items.live_rows()):
            self.attach_index()
        self.rebuild_coclicks()
        self.event_keys = set(event_keys.tolist())
        self.event_ids = set() if event_ids is None else set(event_ids.tolist())
        self.check_models(models, models_path)

    def vouch_for_index(self, path: Path, sample: int = 256) -> None:
        """Check the loaded index against the store: it holds every live row, and a seeded sample of
        them with the store's own vectors. The file was checked only structurally; one of other
        rows or vectors, made checksum-consistent, would serve wrong neighbours. When in doubt,
        rebuild it from the snapshot's vectors, the truth (the cost of that rebuild: see
        docs/reliability.md, "A hostile index file")."""
        live = rows = self.items.live_rows()
        if len(rows) > sample:
            rows = np.sort(np.random.default_rng(self.config.seed).choice(rows, sample, replace=False))
        agrees = self.index.holds(live).all() and self.index.agrees_on(rows, self.ranker.space.index_vectors(rows))
        self.items.release_vector_pages()  # the sample's pages of the mapped vectors file
        if agrees:
            return
        log.warning("%s: the index's vectors differ from the store's; rebuilding it from the snapshot", path)
        self.rebuild_index()

    def attach_index(self) -> None:
        """Milvus: use the collection the snapshot names when it is there, else rebuild it from the
        item table (`reconcile_index` checks it against the store once the log is replayed)."""
        index = self.new_index(self.index_kind(len(self.items.live_rows())))
        if self.milvus is not None and index.attach(self.milvus_collection, len(self.items)):
            self.index = index
        else:
            self.rebuild_index()

    def reconcile_index(self) -> bool:
        """Milvus, after the log is replayed: the collection must hold exactly the live rows, of
        the configured kind, with the store's vectors (checked on a sample); rebuild it from the
        item table when it does not (a crash between a log append and the collection's update,
        a collection dropped or rebuilt by someone else). Returns whether it was rebuilt."""
        if self.milvus is None:
            return False
        rows = self.items.live_rows()
        if self.index is None and not len(rows):
            return False
        rng = np.random.default_rng(self.config.seed)
        if self.index is not None and self.index.agrees_with(
                rows, self.ranker.space.index_vectors(rows), self.index_kind(len(rows)), len(self.items), rng):
            return False
        log.warning("the Milvus collection disagrees with the store; rebuilding it from the item table")
        self.rebuild_index()
        return True

    def check_models(self, models: dict[str, np.ndarray] | None, path: Path) -> None:
        """What the loaded models would save again must be in the file, shaped alike: a tensor a
        loader skipped would otherwise leave a default-initialised model, silently. (None: the
        snapshot has no models file, as one written before any item has not.)"""
        if models is None:
            return
        aside = ("rerank.", "replay.") if self.ranker.reranker.set_aside else ()
        if "tower.residual" in models:  # dense residuals (files before WarmResiduals), converted
            aside += ("tower.warm_",)
        if "replay.features" in models:  # a whole-width replay buffer (rerank.pack), packed on load
            aside += ("replay.",)
        if PROFILE_WEIGHT_TENSOR not in models:  # a store from before the weight was learned: one click
            aside += (PROFILE_WEIGHT_TENSOR,)
        if not any(k.startswith(ANCHOR) for k in models):  # from before the anchor: the loaded weights
            aside += (ANCHOR,)
        if STEPS not in models:  # from before the count was saved: 0
            aside += (STEPS,)
        if f"rerank.{GATE}" not in models:  # from before the MLP's gate: ones (rerank.with_gate)
            aside += (f"rerank.{GATE}", f"{ANCHOR}{GATE}")
        bad = [k for k, v in self.ranker.model_tensors(self.proj).items()
               if not k.startswith(aside) and (k not in models or models[k].shape != np.shape(v))]
        if bad:
            raise CorruptStoreError(f"{path}: missing or misshapen tensor(s) {', '.join(sorted(bad)[:5])}")

    # ---- applying records (live and on replay) -----------------------------------------------
    def apply(self, rec: Record) -> None:
        """Apply one acknowledged record; the only way a logged mutation reaches the state."""
        if isinstance(rec, EventRecord):
            self.apply_event(rec, learn=self.config.online_updates, online_step=True)
        elif isinstance(rec, ImportRecord):
            for ev in rec.events:
                self.apply_event(ev, learn=True, online_step=False)
        elif isinstance(rec, AddRecord):
            self.apply_add(rec)
        elif isinstance(rec, RemoveRecord):
            self.apply_remove(rec.ids)
        elif isinstance(rec, ProfileRecord):
            self.apply_profile(rec.user_id, rec.text, rec.vector)
        elif isinstance(rec, StepRecord):
            self.apply_step(rec)
        else:  # from_payload refuses unknown records; this is a programming error
            raise TypeError(f"not a log record: {type(rec).__name__}")

    def apply_event(self, rec: EventRecord, learn: bool, online_step: bool) -> None:
        """One event, in the order the module docstring gives (steps 1-6)."""
        row = self.items.vocab.row(rec.item_id)
        user = self.users.get_or_create(rec.user_id)
        if not learn:  # frozen: a click or skip marks the item seen; nothing else moves, ever
            if rec.event != "impression":
                user.held.append(row)
            self.remember(rec)
            return
        inline = online_step and not self.deferred_steps
        if online_step and self.deferred_steps and rec.event == "click" and self.ranker.learns_online():
            self.pending.append(PendingStep(rec.key(), row, before_click(user), time.monotonic()))
        if inline and rec.event == "click" and self.index is not None and self.ranker.learns_online():
            plan = self.ranker.step_plan(user, row, self.index, refresh=True, applied=False)
            self.learn(plan)
        self.apply_feedback(user, row, rec.event, rec.t)
        if rec.event == "click":
            user.clicks.append(row)
        elif rec.event == "skip":
            user.skips.append(row)
        elif rec.event == "dislike":
            user.dislikes.append(row)
        else:
            user.impressions += 1
        self.remember(rec)

    def apply_feedback(self, user: UserState, row: int, kind: str, t: int) -> None:
        """Steps 2-4 of an event at time `t`: co-clicks, the user's vector, the item's counts (and
        the popular list's order, which a click may change)."""
        c, items = self.config, self.items
        vec = self.ranker.space.item_vectors(np.array([row]))[0]
        w = self.ranker.profile_weight
        if kind == "click":
            self.coclicks.add_click(user.clicks, row)
            apply_click(user, vec, c.user_min_step, w)
            items.clicks[row] += 1.0
            if c.popularity_half_life_s is not None:
                items.add_decayed_click(row, t, c.popularity_half_life_s)
            items.impressions[row] += 1.0
            self.ranker.popular.bump(row)
        elif kind == "skip":
            apply_skip(user, vec, c.user_min_step, c.skip_step, w)
            items.skips[row] += 1.0
            items.impressions[row] += 1.0
        elif kind == "dislike":  # a strong skip; the item's counts take it as one
            apply_dislike(user, vec, c.user_min_step, c.dislike_step, w)
            items.skips[row] += 1.0
            items.impressions[row] += 1.0
        else:
            items.impressions[row] += 1.0

    # ---- deferred online steps ---------------------------------------------------------------
    def next_step(self, write: Callable[[StepRecord], None],
                  refresh: bool = False) -> tuple[PendingStep, tuple[np.ndarray, np.ndarray] | None] | None:
        """The read half of the step worker's move: the oldest pending click, what its step learns
        from (`Ranker.step_plan`, read from the state as it is now: None when nothing), and its
        StepRecord handed to `write` (the log) at this point of the history. The caller holds the
        engine's read lock (`refresh` false: NeedsWrite before anything changed) or its write
        lock, then gives the plan to `learn`, in order, before the next call. None when nothing
        is pending."""
        if not self.pending:
            return None
        entry = self.pending[0]
        plan = self.ranker.step_plan(entry.user, entry.row, self.index, refresh) if self.ranker.learns_online() else None
        write(StepRecord(entry.key, plan is not None))
        self.pending.popleft()
        return entry, plan

    def learn(self, plan: tuple[np.ndarray, np.ndarray] | None) -> None:
        """The step itself (models/rerank.partial_fit: new weights swapped in whole, so requests
        scoring meanwhile read the old or the new ones)."""
        if plan is not None:
            self.ranker.reranker.partial_fit(*plan)

    def apply_step(self, rec: StepRecord) -> None:
        """A logged step, replayed: the same click, from the same state, as when it was written."""
        at = next((n for n, e in enumerate(self.pending) if e.key == rec.key), None)
        if at is None:
            log.warning("a step record (key %d) finds no pending click; ignored", rec.key)
            return
        if at:
            log.warning("a step record passes %d older pending click(s); their steps are dropped", at)
        for _ in range(at):
            self.pending.popleft()
        entry = self.pending.popleft()
        if rec.taken and self.ranker.learns_online():
            self.learn(self.ranker.step_plan(entry.user, entry.row, self.index, refresh=True))

    def remember(self, rec: EventRecord) -> None:
        """Step 6: the event's identity, and its caller-given id when it has one."""
        self.event_keys.add(rec.key())
        if rec.event_id is not None:
            self.event_ids.add(id_key(rec.event_id))

    def holds_event_id(self, event_id: str) -> bool:
        """Has an event with this caller-given id been applied (before now, or since a snapshot)?"""
        return id_key(event_id) in self.event_ids

    def apply_add(self, rec: AddRecord) -> None:
        rows = np.array([self.items.append(item, rec.vectors[j], rec.t) for j, item in enumerate(rec.items)],
                        dtype=np.int64)
        self.ranker.items_added(self.items, self.proj, rows)
        for r in rows:
            self.lexicon.set(int(r), item_text(self.items.item(int(r))))
        # An upserted or revived row still has its old vector in FAISS under the same id: rebuild
        # (Milvus replaces it in place).
        replaced = self.index is not None and bool(self.index.holds(rows).any())
        need_kind = self.index_kind(len(self.items.live_rows()))
        if (self.index is None or (replaced and not self.index.in_place_upsert)
                or self.index.kind != need_kind or self.index.ntotal == 0):
            self.rebuild_index()
        elif replaced:
            self.index.upsert(rows, self.ranker.space.index_vectors(rows))
        else:
            self.index.add(rows, self.ranker.space.index_vectors(rows))

    def apply_remove(self, ids: tuple[str, ...]) -> None:
        rows = np.array([self.items.vocab.row(i) for i in ids], dtype=np.int64)
        self.items.removed[rows] = True
        self.index.remove(rows)
        for r in rows:
            self.lexicon.clear(int(r))
        self.ranker.popular.invalidate()
        if self.index.tombstone_ratio() > self.config.compact_ratio and len(self.items.live_rows()):
            self.rebuild_index()

    def apply_profile(self, user_id: str, text: str, vec: np.ndarray) -> None:
        user = self.users.get_or_create(user_id)
        user.profile, user.profile_vec = text, vec
        self.rederive(user)

    def rederive(self, user: UserState) -> None:
        """The user's vector again from the profile and the history (after the space changed)."""
        rows = np.array(user.clicks + user.skips + user.dislikes, dtype=np.int64)
        item_vecs = self.ranker.space.item_vectors(rows)
        prof = None if user.profile_vec is None else self.proj.transform(user.profile_vec[None])[0]
        c = self.config
        rederive(user, item_vecs, prof, c.user_min_step, c.skip_step, c.dislike_step, self.ranker.profile_weight)

    def refresh_space(self) -> None:
        """Every item's retrieval vector and bias again, and the lexicon when it lags the item
        table (after open, or training)."""
        n = len(self.items)
        if len(self.lexicon) != n:
            self.lexicon.rebuild((item_text(self.items.item(r)) for r in range(n)), self.items.removed)
        self.ranker.refresh(self.items, self.proj)

    def rebuild_coclicks(self, skip: np.ndarray | None = None) -> None:
        """Co-click counts from every stored click history (on open and after fit), or from all
        but the users at positions `skip` (fit's cross-fitting)."""
        gone = set() if skip is None else set(skip.tolist())
        states = [u for i, u in enumerate(self.users.states) if i not in gone]
        self.coclicks.build([u.clicks for u in states], len(self.items))

    # ---- reading -----------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        return {"items": len(self.items), "live_items": int(len(self.items.live_rows())),
                "users": len(self.users)}

    def events(self) -> int:
        """Events in the users' histories (item statistics count a click as an impression too)."""
        return sum(len(u.clicks) + len(u.skips) + len(u.dislikes) + len(u.held) + u.impressions
                   for u in self.users.states)

    def event_key_array(self) -> np.ndarray:
        """The event identities as a sorted uint64 array, for the snapshot."""
        return np.array(sorted(self.event_keys), dtype=np.uint64)

    def event_id_array(self) -> np.ndarray:
        """The hashed caller-given event ids as a sorted uint64 array, for the snapshot."""
        return np.array(sorted(self.event_ids), dtype=np.uint64)

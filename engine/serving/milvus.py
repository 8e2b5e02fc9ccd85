"""Milvus behind the same contract as the FAISS `VectorIndex`: rows in, rows out.

(Over 450 lines, as one module: `MilvusHome` (where a store's collections live, their names and
their clean-up) and `MilvusIndex` (one collection behind the index contract, with its retries,
consistency level and reconciliation checks) are one backend, read together; most of the length
is the index's contract, as long as `VectorIndex`'s.)

Rows are Milvus int64 primary keys. A removal deletes the entity (Milvus compacts on its own, so
there are no tombstones here), an upsert replaces the vector in place, and every search carries
the removed, seen and filtered-out rows as a boolean `filter` expression, so Milvus skips them
during the search and returns k rows whenever k qualify.

Where the collection lives (`MilvusHome`): `Config.milvus_uri`, a Milvus Lite file (a path ending
in `.db`; None means `STORE/milvus.db`, a relative path is taken from the store directory) or a
server address (`http://host:19530`). Each store owns the collections named `<prefix>_<token>`;
a full rebuild makes a new collection, and the one the manifest names is kept until the next
snapshot is committed, so a crash mid-rebuild leaves the previous one intact. Milvus Lite
(milvus-lite 3.x) builds FLAT, HNSW, HNSW_SQ, IVF_FLAT and IVF_SQ8, not IVF_PQ.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..errors import InvalidInputError, StoreError
from ..vectors import grown
from ..vectors import check_vectors
from .index import one_query

log = logging.getLogger(__name__)

#: Milvus index type and build parameters of each Kindling index kind ("auto" is resolved before).
MILVUS_INDEX = {"flat": "FLAT", "hnsw": "HNSW", "hnsw-sq8": "HNSW_SQ", "ivf": "IVF_FLAT", "ivf-pq": "IVF_PQ"}
KIND_OF = {v: k for k, v in MILVUS_INDEX.items()}
#: Index types milvus-lite 3.x builds (it accepts others and then never builds them).
LITE_KINDS = ("flat", "hnsw", "hnsw-sq8", "ivf")
#: Rows per insert/upsert call (well under gRPC's message limit at 384 float32 dimensions).
BATCH_ROWS = 10_000
#: Milvus's largest `limit` of one search.
MAX_TOPK = 16_384
#: Live rows whose stored vector is compared with the store's when a collection is reattached.
CHECK_SAMPLE = 64
#: Seconds a write keeps retrying while the server is unreachable (a standalone server restarts in
#: ~10 s on a 2-core host); then it raises StoreError and the collection is reconciled at reopen.
RETRY_S = 30.0
#: The status code of a search on a released collection ("collection not loaded").
NOT_LOADED = 101
_SCALE_HINT = "install the scale extra: pip install 'kindling[scale]'"

_lite_lock = threading.Lock()
_lite_refs: dict[str, int] = {}


def is_lite(uri: str) -> bool:
    """Whether `uri` names a Milvus Lite file (pymilvus runs those in this process)."""
    return not uri.startswith(("http://", "https://", "tcp://", "unix:"))


def resolve_uri(uri: str | None, store_path: Path) -> str:
    """The URI a store's collection lives at: `STORE/milvus.db` by default, local paths made absolute
    against the store directory."""
    if uri is None:
        return str(Path(store_path) / "milvus.db")
    if is_lite(uri):
        return str((Path(store_path) / uri).resolve()) if not os.path.isabs(uri) else uri
    return uri


class MilvusHome:
    """One store's connection to Milvus and the collections it owns (named `<prefix>_<token>`).

    Args:
        uri: a Milvus Lite file path ending in ".db", or a server address (http://host:19530).
        prefix: the store's collection-name prefix (saved in the manifest).
        token: credentials for a server ("user:password" or an API key); None for none.
    """

    def __init__(self, uri: str, prefix: str | None = None, token: str | None = None) -> None:
        self.uri = uri
        self.lite = is_lite(uri)
        if self.lite and not uri.endswith(".db"):
            raise InvalidInputError(f"milvus_uri must be a server address (http://host:19530) or a "
                                    f"Milvus Lite file whose name ends in .db; got {uri!r}")
        self.prefix = prefix or "kindling_" + secrets.token_hex(6)
        try:
            from pymilvus import MilvusClient
        except ImportError as exc:
            raise StoreError(f"index_backend 'milvus' needs pymilvus and milvus-lite; {_SCALE_HINT}") from exc
        try:
            self.client = MilvusClient(uri, token=token or "")
        except Exception as exc:  # pymilvus raises its own classes; name the URI and the likely cause
            why = ("another process may have it open: Milvus Lite allows one process per file"
                   if self.lite else "is the server running?")
            raise StoreError(f"cannot open Milvus at {uri} ({why}): {exc}") from exc
        if self.lite:
            with _lite_lock:
                _lite_refs[os.path.abspath(uri)] = _lite_refs.get(os.path.abspath(uri), 0) + 1
        self._closed = False

    def new_name(self) -> str:
        return f"{self.prefix}_{secrets.token_hex(4)}"

    def collections(self) -> list[str]:
        """This store's collections."""
        return [c for c in self.client.list_collections() if c.startswith(self.prefix + "_")]

    def drop_others(self, keep: Sequence[str | None]) -> None:
        """Drop this store's collections but `keep` (stale ones a crash or a rebuild left).

        Best effort: a drop that fails (Milvus Lite can fail one that races its background index
        build) is logged and tried again at the next cleanup; the snapshot is committed already.
        """
        for name in self.collections():
            if name not in keep:
                try:
                    self.client.drop_collection(name)
                except Exception as exc:  # pymilvus's errors share no base class worth naming here
                    log.warning("could not drop stale Milvus collection %s (%s); will retry", name, exc)

    def drop_all(self) -> None:
        self.drop_others(())

    def close(self) -> None:
        """Close the connection; the last user of a Milvus Lite file stops its in-process server,
        so that another process may open the file."""
        if self._closed:
            return
        self._closed = True
        try:
            self.client.close()
        finally:
            if self.lite:
                path = os.path.abspath(self.uri)
                with _lite_lock:
                    _lite_refs[path] -= 1
                    last = _lite_refs[path] == 0
                    if last:
                        del _lite_refs[path]
                if last:
                    from milvus_lite.server_manager import server_manager_instance
                    server_manager_instance.release_server(path)

    def describe(self, collection: str | None) -> dict[str, str | None]:
        """What the manifest records: the prefix and the collection of this snapshot."""
        return {"prefix": self.prefix, "collection": collection}


class MilvusIndex:
    """Inner-product search over rows in one Milvus collection (see the module docstring).

    The same methods as `index.VectorIndex`; `holds` and `contains` agree (there are no
    tombstones) and `upsert` replaces vectors in place.
    """

    backend = "milvus"
    in_place_upsert = True

    def __init__(self, home: MilvusHome, dim: int, kind: str = "flat", *, hnsw_m: int = 32,
                 ef_construction: int = 40, ef_search: int = 128, nlist: int = 0, nprobe: int = 32,
                 **_: object) -> None:
        if kind not in MILVUS_INDEX:
            raise ValueError(f"index kind must be one of {', '.join(MILVUS_INDEX)}; got {kind!r}")
        if home.lite and kind not in LITE_KINDS:
            raise InvalidInputError(f"Milvus Lite does not build {MILVUS_INDEX[kind]} (index {kind!r}); "
                                    f"use one of {', '.join(LITE_KINDS)} or a Milvus server")
        self.home, self.dim, self.kind = home, int(dim), kind
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.nlist, self.nprobe = nlist, nprobe
        self.collection: str | None = None
        self._held = np.zeros(0, dtype=bool)  # by row: the collection holds it
        self._n = 0
        self._unconfirmed_deletes: set[int] = set()  # removed rows Milvus may still hold

    @property
    def client(self):
        return self.home.client

    # ---- building -------------------------------------------------------------------------
    def _index_params(self, n: int):
        params = {"flat": {}, "hnsw": {"M": self.hnsw_m, "efConstruction": self.ef_construction},
                  "hnsw-sq8": {"M": self.hnsw_m, "efConstruction": self.ef_construction, "sq_type": "SQ8"},
                  "ivf": {"nlist": self._nlist(n)},
                  "ivf-pq": {"nlist": self._nlist(n), "m": _pq_m(self.dim), "nbits": 8}}[self.kind]
        ip = self.client.prepare_index_params()
        ip.add_index("vec", index_type=MILVUS_INDEX[self.kind], metric_type="IP", params=params)
        return ip

    def _nlist(self, n: int) -> int:
        return self.nlist or max(1, min(int(4 * np.sqrt(max(n, 1))), n // 39 or 1))

    def build(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Make a new collection holding exactly these rows (the previous one stays until cleanup)."""
        from pymilvus import DataType

        vectors = check_vectors(vectors, self.dim)
        rows = _check_rows(rows, len(vectors))
        name = self.home.new_name()
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", DataType.INT64, is_primary=True)
        schema.add_field("vec", DataType.FLOAT_VECTOR, dim=self.dim)
        self.client.create_collection(name, schema=schema, consistency_level="Strong")
        # The index of an empty collection, not waited for: pymilvus's wait polls every 0.5 s
        # (and asks Milvus Lite for a timestamp it does not serve); rows inserted next are indexed.
        self.client.create_index(name, self._index_params(len(rows)), sync=False)
        self.client.load_collection(name)
        self.collection = name
        self._held = np.zeros(0, dtype=bool)
        self._n = 0
        self._unconfirmed_deletes.clear()
        self._write(rows, vectors, upsert=False)
        if len(rows):
            self.client.flush(name)  # seal the bulk load: Milvus indexes sealed segments

    def attach(self, name: str | None, n_rows: int) -> bool:
        """Use the existing collection `name` (of a store with `n_rows` item rows); False when it is
        missing or not shaped for this index."""
        if not name or not self.client.has_collection(name):
            return False
        try:
            info = self.client.describe_index(name, "vec")
            kind = KIND_OF.get(str(info.get("index_type", "")))
            dims = [f for f in self.client.describe_collection(name)["fields"] if f["name"] == "vec"]
            if kind is None or not dims or int(dims[0]["params"]["dim"]) != self.dim:
                return False
            self.client.load_collection(name)
        except Exception as exc:  # a damaged collection: the caller rebuilds it
            log.warning("Milvus collection %s is unusable (%s); it will be rebuilt", name, exc)
            return False
        self.collection, self.kind = name, kind
        ids = self.stored_rows(n_rows)
        self._held = np.zeros(int(ids.max()) + 1 if len(ids) else 0, dtype=bool)
        self._held[ids] = True
        self._n = len(ids)
        return True

    def stored_count(self) -> int:
        """How many entities the collection holds, asked of Milvus."""
        got = self.client.query(self.collection, filter="", output_fields=["count(*)"])
        return int(got[0]["count(*)"])

    def stored_rows(self, n_rows: int) -> np.ndarray:
        """The rows below `n_rows` the collection holds, asked of Milvus (not of this object's
        bookkeeping), in pages of ids that fit one query's result window."""
        out = []
        for lo in range(0, n_rows, MAX_TOPK):
            got = self.client.query(self.collection, filter=f"id >= {lo} and id < {lo + MAX_TOPK}",
                                    output_fields=["id"], limit=MAX_TOPK)
            out.extend(int(e["id"]) for e in got)
        return np.unique(np.array(out, dtype=np.int64))

    def stored_vectors(self, rows: np.ndarray) -> dict[int, np.ndarray]:
        """The vectors Milvus holds for `rows` (rows it lacks are absent from the result)."""
        got = self.client.get(self.collection, ids=[int(r) for r in rows], output_fields=["vec"])
        return {int(e["id"]): np.asarray(e["vec"], np.float32) for e in got}

    def _write(self, rows: np.ndarray, vectors: np.ndarray, upsert: bool) -> None:
        self._retry_deletes()
        for s in range(0, len(rows), BATCH_ROWS):
            batch = [{"id": int(r), "vec": v} for r, v in zip(rows[s:s + BATCH_ROWS], vectors[s:s + BATCH_ROWS])]
            # After a lost connection an insert may have reached the server: upsert is idempotent.
            self._call("write rows to", lambda b=batch, up=upsert: (self.client.upsert if up else self.client.insert)(
                self.collection, b), lambda b=batch: self.client.upsert(self.collection, b))
        if len(rows):
            self._held = grown(self._held, int(rows.max()) + 1)
            self._n += int((~self._held[rows]).sum())
            self._held[rows] = True

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Insert `vectors` (shape (n, dim), float32) under new `rows`; `upsert` replaces held ones.

        Raises:
            InvalidInputError: wrong dtype, shape or values; negative, repeated or already held rows.
        """
        vectors = check_vectors(vectors, self.dim)
        rows = _check_rows(rows, len(vectors))
        held = self.holds(rows)
        if held.any():
            raise InvalidInputError(f"row {int(rows[held][0])} is already in the index; use upsert to replace it")
        self._ensure_built(vectors)
        self._write(rows, vectors, upsert=False)

    def upsert(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Index `vectors` under `rows`, replacing the vectors of rows already held."""
        vectors = check_vectors(vectors, self.dim)
        rows = _check_rows(rows, len(vectors))
        self._ensure_built(vectors)
        self._write(rows, vectors, upsert=True)

    def _ensure_built(self, vectors: np.ndarray) -> None:
        if self.collection is None:
            self.build(np.zeros(0, np.int64), np.zeros((0, self.dim), np.float32))

    def remove(self, rows: Sequence[int] | np.ndarray) -> None:
        """Delete rows from the collection (rows it does not hold are ignored)."""
        rows = np.unique(np.asarray(rows, dtype=np.int64))
        rows = rows[self.contains(rows)]
        if len(rows):
            self._held[rows] = False
            self._n -= len(rows)
            # Until Milvus confirms the delete, every search excludes the rows (see _retry_deletes).
            self._unconfirmed_deletes.update(int(r) for r in rows)
            self._retry_deletes()

    def _retry_deletes(self) -> None:
        """Send the deletes Milvus has not confirmed (a removal while the server was unreachable)."""
        if self._unconfirmed_deletes and self.collection is not None:
            gone = sorted(self._unconfirmed_deletes)
            self._call("delete rows from", lambda: self.client.delete(self.collection, ids=gone))
            self._unconfirmed_deletes.difference_update(gone)

    def _call(self, what: str, call: Callable[[], object], again: Callable[[], object] | None = None) -> object:
        """Run a write, retrying while the server is unreachable for up to RETRY_S seconds.

        Raises:
            StoreError: Milvus stayed unreachable, or refused the write. The change is in the
                store's log already; the collection is reconciled with it when the store reopens.
        """
        end, pause = time.monotonic() + RETRY_S, 0.2
        while True:
            try:
                return call()
            except Exception as exc:  # pymilvus's errors share no base class worth naming here
                if not _unreachable(exc) or time.monotonic() >= end:
                    raise StoreError(f"could not {what} Milvus collection {self.collection} at {self.home.uri} "
                                     f"({exc}); the change is in the store's log, and the collection is "
                                     "reconciled with it when the store is reopened") from exc
                log.warning("Milvus at %s is unreachable (%s); retrying", self.home.uri, exc)
            time.sleep(pause)
            pause = min(2 * pause, 2.0)
            call = again or call

    def stored(self, rows: np.ndarray, width: int | None = None) -> None:
        """None: the vectors live in Milvus, not in this process (the ranker reads the item table)."""
        return None

    def decoded(self, rows: np.ndarray, width: int | None = None) -> None:
        """None: as `stored`."""
        return None

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """Which rows are searchable."""
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        ok = (rows >= 0) & (rows < len(self._held))
        out = np.zeros(len(rows), dtype=bool)
        out[ok] = self._held[rows[ok]]
        return out

    holds = contains  # a deleted entity is gone: nothing is held that is not searchable

    @property
    def ntotal(self) -> int:
        return self._n

    @property
    def n_live(self) -> int:
        return self._n

    def tombstone_ratio(self) -> float:
        return 0.0

    # ---- search -----------------------------------------------------------------------------
    def filter_expression(self, exclude: np.ndarray | None, allowed: np.ndarray | None) -> str | None:
        """The Milvus boolean expression of `exclude` and `allowed`; "" for no restriction, None
        when no row can qualify. `allowed` becomes `id in [...]` or `id not in [...]`, whichever
        list is shorter."""
        parts = []
        if allowed is not None:
            held = np.flatnonzero(self._held)
            ok = np.zeros(len(held), dtype=bool)
            inside = held < len(allowed)
            ok[inside] = np.asarray(allowed, bool)[held[inside]]
            if exclude is not None and len(exclude):
                ok &= ~np.isin(held, exclude)
                exclude = None
            yes, no = held[ok], held[~ok]
            if not len(yes):
                return None
            if len(no):
                parts.append(_in_list(yes, True) if len(yes) <= len(no) else _in_list(no, False))
        if exclude is not None and len(exclude):
            parts.append(_in_list(np.unique(np.asarray(exclude, np.int64)), False))
        return " and ".join(parts)

    def _search_params(self, k: int) -> dict:
        if self.kind.startswith("hnsw"):
            return {"metric_type": "IP", "params": {"ef": max(self.ef_search, k)}}
        if self.kind.startswith("ivf"):
            return {"metric_type": "IP", "params": {"nprobe": self.nprobe}}
        return {"metric_type": "IP", "params": {}}

    def search(self, query: np.ndarray, k: int, exclude: np.ndarray | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k rows by inner product, skipping `exclude` and rows not `allowed` inside Milvus.

        Args and Returns as `index.VectorIndex.search`.
        """
        return self.search_batch(one_query(query, self.dim), k, exclude, allowed)[0]

    def search_batch(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
                     allowed: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """`search` for many queries in one Milvus call, the same `exclude` and `allowed` for all."""
        q = check_vectors(queries, self.dim, "queries")
        empty = [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(q))]
        if self.collection is None or self._n == 0 or k <= 0 or not len(q):
            return empty
        if self._unconfirmed_deletes:
            gone = np.fromiter(self._unconfirmed_deletes, np.int64)
            exclude = gone if exclude is None else np.concatenate([np.asarray(exclude, np.int64), gone])
        expr = self.filter_expression(exclude, allowed)
        if expr is None:
            return empty
        limit = int(min(k, self._n, MAX_TOPK))
        def call():
            # Session: this client's own writes are visible (pymilvus sends their timestamp as the
            # guarantee); the collection's Strong level would wait for the server's next time tick,
            # ~200 ms on every search of a standalone server.
            return self.client.search(self.collection, data=[v for v in q], limit=limit, filter=expr,
                                      search_params=self._search_params(limit), anns_field="vec",
                                      consistency_level="Session")

        try:
            try:
                found = call()
            except Exception as exc:  # noqa: BLE001 - pymilvus's errors share no useful base class
                if getattr(exc, "code", None) != NOT_LOADED:
                    raise
                # A restarted server (standalone 2.3) comes back with the collection released.
                self.client.load_collection(self.collection)
                found = call()
        except Exception as exc:  # a read is not retried further: the caller's request fails now
            raise StoreError(f"Milvus search in {self.collection} at {self.home.uri} failed ({exc})") from exc
        out = []
        for hits in found:
            rows = np.array([int(h["id"]) for h in hits], np.int64)
            scores = np.array([float(h["distance"]) for h in hits], np.float32)
            order = np.argsort(-scores, kind="stable")
            out.append((rows[order], scores[order]))
        return out

    # ---- persistence ------------------------------------------------------------------------
    def agrees_with(self, rows: np.ndarray, vectors: np.ndarray, kind: str, n_rows: int,
                    rng: np.random.Generator) -> bool:
        """Whether the collection holds exactly `rows` (of `n_rows` item rows), of index `kind`,
        with these vectors on a sample."""
        if self.collection is None or self.kind != kind:
            return False
        if self.stored_count() != len(rows) or not np.array_equal(self.stored_rows(n_rows), np.unique(rows)):
            return False
        if not len(rows):
            return True
        pick = rng.choice(len(rows), size=min(CHECK_SAMPLE, len(rows)), replace=False)
        stored = self.stored_vectors(rows[pick])
        return all(int(rows[j]) in stored and np.allclose(stored[int(rows[j])], vectors[j], atol=1e-5)
                   for j in pick)


def _unreachable(exc: Exception) -> bool:
    """Whether a pymilvus error means the server could not be reached (worth retrying)."""
    try:
        import grpc
    except ImportError:  # pragma: no cover - pymilvus depends on grpcio
        grpc = None
    if grpc is not None and isinstance(exc, grpc.RpcError):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return getattr(exc, "code", None) == 2  # pymilvus's CONNECT_FAILED, raised once its reconnect fails


def _check_rows(rows: np.ndarray, n: int) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or len(rows) != n:
        raise InvalidInputError(f"got {rows.shape} rows for {n} vectors; need one row each")
    if len(rows) and (rows.min() < 0 or len(np.unique(rows)) != len(rows)):
        raise InvalidInputError("rows must be distinct non-negative integers")
    return rows


def _in_list(rows: np.ndarray, inside: bool) -> str:
    body = ",".join(map(str, rows.tolist()))
    return f"id in [{body}]" if inside else f"id not in [{body}]"


def _pq_m(dim: int) -> int:
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m

"""FAISS behind one class: stable int64 rows, tombstoned removal, exclusions inside the search.

Rows are the engine's item rows and never change; FAISS's internal ids and its `-1` padding never
leave this module. Removal clears a bit in a `live` bitmap that every search passes to FAISS as an
IDSelector (together with the caller's exclusions), so removed and excluded items are skipped during
the search itself, for every index type, instead of being over-fetched and filtered afterwards.
Compaction rebuilds the FAISS index from the live rows once tombstones pass a ratio.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np

from ..errors import CorruptStoreError, InvalidInputError
from ..vectors import check_vectors, grown
from .faiss_file import check_ids, read_index

log = logging.getLogger(__name__)

#: The FAISS factory string of every index kind of config.INDEX_KINDS but "auto".
FACTORY = {"flat": "Flat", "hnsw": "HNSW{m}", "hnsw-sq8": "HNSW{m},SQ8", "ivf": "IVF{nlist},Flat",
           "ivf-pq": "IVF{nlist},PQ{pq}"}


#: Batches up to this many queries search with `search_threads` threads; larger ones use all cores.
SMALL_BATCH = 16


def one_query(query: object, dim: int) -> np.ndarray:
    """A single query vector as the batch of one that `search_batch` takes: shape (1, dim).

    Raises:
        InvalidInputError: not a numpy array of `dim` values.
    """
    if not isinstance(query, np.ndarray) or query.size != dim:
        raise InvalidInputError(f"query must be a numpy array of shape ({dim},) or (1, {dim}); "
                                f"got {getattr(query, 'shape', type(query).__name__)}")
    return query.reshape(1, -1)


class VectorIndex:
    """Inner-product search over rows, with tombstones and per-query exclusions.

    Args:
        dim: vector width.
        kind: "flat" (exact), "hnsw", "hnsw-sq8", "ivf" or "ivf-pq".
    """

    backend = "faiss"
    #: FAISS keeps a replaced row's old vector (HNSW cannot delete): the engine rebuilds instead.
    in_place_upsert = False

    def __init__(self, dim: int, kind: str = "flat", *, hnsw_m: int = 32, ef_construction: int = 40,
                 ef_search: int = 128, nlist: int = 0, nprobe: int = 32, search_threads: int = 1) -> None:
        if kind not in FACTORY:
            raise ValueError(f"index kind must be one of {', '.join(FACTORY)}; got {kind!r}")
        self.dim, self.kind = int(dim), kind
        self.hnsw_m, self.ef_construction, self.ef_search = hnsw_m, ef_construction, ef_search
        self.nlist, self.nprobe = nlist, nprobe
        self.search_threads = int(search_threads)
        self._faiss: faiss.Index | None = None
        self._live = np.zeros(0, dtype=np.uint8)  # bit r set <=> row r is in the index and not removed
        self._held = np.zeros(0, dtype=np.uint8)  # bit r set <=> FAISS holds a vector of row r
        self._n_added = 0
        self._n_removed = 0
        #: zero columns FAISS's vectors carry beyond `dim`: hnsw-sq8 pads to a multiple of 8, where
        #: FAISS's SQ8 distances take their SIMD path (385 wide: 3-4x slower builds and searches)
        self._pad = (-self.dim) % 8 if kind == "hnsw-sq8" else 0
        self._pos: np.ndarray | None = None   # row -> FAISS's internal position (-1: not held)
        self._xb: np.ndarray | None = None    # a view of FAISS's own float32 storage, (ntotal, dim)
        self._codes: np.ndarray | None = None  # hnsw-sq8: a view of its codes, (ntotal, code size)
        self._sq: faiss.IndexScalarQuantizer | None = None  # hnsw-sq8: the storage that decodes them

    # ---- building -------------------------------------------------------------------------
    def _new_faiss(self, train: np.ndarray) -> faiss.Index:
        n = len(train)
        nlist = self.nlist or max(1, min(int(4 * np.sqrt(max(n, 1))), n // 39 or 1))
        spec = FACTORY[self.kind].format(m=self.hnsw_m, nlist=nlist, pq=_pq_subquantizers(self.dim))
        if self.kind == "ivf-pq" and n < 256:  # 8-bit codes need 256 training points; use fewer bits
            spec += f"x{max(1, int(np.log2(max(n // 39, 2))))}"
        inner = faiss.index_factory(self.dim + self._pad, spec, faiss.METRIC_INNER_PRODUCT)
        if "HNSW" in spec:
            hnsw = faiss.downcast_index(inner) if not hasattr(inner, "hnsw") else inner
            hnsw.hnsw.efConstruction = self.ef_construction
        if not inner.is_trained:
            if n == 0:
                raise InvalidInputError(f"an {self.kind} index needs training vectors; add items first")
            inner.train(self._padded(train))
        return faiss.IndexIDMap(inner)  # not IDMap2: its reverse hash map costs ~50 B a row, unused

    def _padded(self, x: np.ndarray) -> np.ndarray:
        """`x` (n, dim) with the index's zero columns appended (inner products unchanged)."""
        return np.pad(x, ((0, 0), (0, self._pad))) if self._pad else x

    def build(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the whole index with these rows (used at first build and by compaction)."""
        vectors = check_vectors(vectors, self.dim)
        rows = np.asarray(rows, dtype=np.int64)
        self._faiss = self._new_faiss(vectors)
        self._live = np.zeros(0, dtype=np.uint8)
        self._held = np.zeros(0, dtype=np.uint8)
        self._n_added = self._n_removed = 0
        self._pos = self._xb = self._codes = None
        if len(rows):
            self.add(rows, vectors)

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Index `vectors` (shape (n, dim), float32) under `rows`.

        Rows must be new to this index: FAISS would keep a removed row's old vector under the same
        id, so a row that comes back (an upsert, a revived id) needs `build` instead.

        Raises:
            InvalidInputError: wrong dtype, shape or values; negative, repeated or already held rows.
        """
        vectors = check_vectors(vectors, self.dim)
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or len(rows) != len(vectors):
            raise InvalidInputError(f"got {rows.shape} rows for {len(vectors)} vectors; need one row each")
        if len(rows) and (rows.min() < 0 or len(np.unique(rows)) != len(rows)):
            raise InvalidInputError("rows must be distinct non-negative integers")
        held = self.holds(rows)
        if held.any():
            raise InvalidInputError(f"row {int(rows[held][0])} is already in the index; "
                                    "rebuild the index to replace a vector")
        if self._faiss is None:
            self._faiss = self._new_faiss(vectors)
        if len(rows) == 0:
            return
        self._grow(int(rows.max()) + 1)
        first = int(self._faiss.ntotal)
        self._faiss.add_with_ids(self._padded(vectors), rows)
        if self._pos is not None:  # appended in order: the positions follow the last one
            self._pos = grown(self._pos, int(rows.max()) + 1, fill=-1)
            self._pos[rows] = first + np.arange(len(rows))
        self._refresh_storage()  # FAISS may have moved its storage as it grew
        self._set_bits(rows, True)
        self._set_bits(rows, True, self._held)
        self._n_added += len(rows)

    def upsert(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Index `vectors` under `rows`, replacing held rows' vectors; only on the kinds whose FAISS
        index can delete (flat, ivf, ivf-pq).

        Raises:
            InvalidInputError: as `add`, or a held row on an HNSW index (rebuild it instead).
        """
        vectors = check_vectors(vectors, self.dim)
        rows = np.asarray(rows, dtype=np.int64)
        held = self.holds(rows) if rows.ndim == 1 else np.zeros(0, bool)
        if held.any():
            if self.kind.startswith("hnsw"):
                raise InvalidInputError(f"an {self.kind} FAISS index cannot replace a vector (row "
                                        f"{int(rows[held][0])}); rebuild the index instead")
            gone = rows[held]
            self._faiss.remove_ids(faiss.IDSelectorBatch(gone))
            self._pos = self._xb = self._codes = None  # removal compacts FAISS's storage
            self._refresh_storage()
            self._n_added -= len(gone)
            self._n_removed -= int((~self.contains(gone)).sum())
            self._set_bits(gone, False)
            self._set_bits(gone, False, self._held)
        self.add(rows, vectors)

    def remove(self, rows: Sequence[int] | np.ndarray) -> None:
        """Tombstone rows: they are skipped by every later search."""
        rows = np.asarray(rows, dtype=np.int64)
        rows = rows[rows < len(self._live) * 8]
        live = self.contains(rows)
        self._set_bits(rows[live], False)
        self._n_removed += int(live.sum())

    def _grow(self, n_rows: int) -> None:
        need = (n_rows + 7) // 8  # bytes of the bitmaps
        self._live, self._held = grown(self._live, need), grown(self._held, need)

    def _set_bits(self, rows: np.ndarray, value: bool, bitmap: np.ndarray | None = None) -> None:
        bitmap = self._live if bitmap is None else bitmap
        byte, bit = rows >> 3, (rows & 7).astype(np.uint8)
        masks = np.left_shift(np.uint8(1), bit)
        if value:
            np.bitwise_or.at(bitmap, byte, masks)
        else:
            np.bitwise_and.at(bitmap, byte, np.invert(masks))

    @staticmethod
    def _test_bits(bitmap: np.ndarray, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        ok = (rows >= 0) & (rows < len(bitmap) * 8)
        out = np.zeros(len(rows), dtype=bool)
        r = rows[ok]
        out[ok] = (bitmap[r >> 3] >> (r & 7).astype(np.uint8)) & 1 == 1
        return out

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """Which rows are searchable (added and not removed)."""
        return self._test_bits(self._live, rows)

    def holds(self, rows: np.ndarray) -> np.ndarray:
        """Which rows FAISS holds a vector for, removed ones included (they go at the next build)."""
        return self._test_bits(self._held, rows)

    def stored(self, rows: np.ndarray, width: int | None = None) -> np.ndarray | None:
        """The vectors FAISS holds for `rows` (the first `width` columns; default all), a float32
        copy read straight from FAISS's own float storage: the index is then the process's one
        copy of what it holds. None when the kind keeps codes, not floats (hnsw-sq8, ivf, ivf-pq),
        or a row is not held."""
        at = self._positions(rows) if self._xb is not None else None
        return None if at is None else self._xb[at, :width]

    def decoded(self, rows: np.ndarray, width: int | None = None) -> np.ndarray | None:
        """hnsw-sq8: the vectors its 8-bit codes stand for (what its search scores), for `rows`
        (the first `width` columns; default all), decoded from FAISS's own codes: serving from
        the compressed index reads no float copy. None for other kinds, or a row not held."""
        at = self._positions(rows) if self._codes is not None else None
        if at is None:
            return None
        return self._sq.sa_decode(np.ascontiguousarray(self._codes[at]))[:, : self.dim if width is None else width]

    def _positions(self, rows: np.ndarray) -> np.ndarray | None:
        """FAISS's storage position of each of `rows` (int64), or None if one is not held."""
        pos = self._pos
        if pos is None:
            return None
        rows = np.asarray(rows, dtype=np.int64)
        if rows.shape == (1,):  # one row (a click's step): Python ints, not three reductions
            r = int(rows[0])
            at = int(pos[r]) if 0 <= r < len(pos) else -1
            return None if at < 0 else np.array([at])
        if len(rows) and (rows.min() < 0 or rows.max() >= len(pos)):
            return None
        at = pos[rows]
        return None if len(at) and at.min() < 0 else at

    def _refresh_storage(self) -> None:
        """After anything that can move FAISS's storage (add, remove, build, load), on the write
        path: a numpy view of it with no copy (flat, hnsw: the float32 vectors (ntotal, dim);
        hnsw-sq8: the codes), and each row's position in it (FAISS's internal order). Readers
        (`stored`, `decoded`) only read them."""
        if self._faiss is None or self.kind not in ("flat", "hnsw", "hnsw-sq8"):
            self._pos = self._xb = self._codes = None
            return
        inner = faiss.downcast_index(self._faiss.index)
        flat = faiss.downcast_index(inner.storage) if self.kind.startswith("hnsw") else inner
        n = int(flat.ntotal)
        if self.kind == "hnsw-sq8":
            self._sq, size = flat, int(flat.code_size)
            self._codes = (faiss.rev_swig_ptr(flat.codes.data(), n * size).reshape(n, size) if n
                           else np.zeros((0, size), np.uint8))
        else:
            self._xb = (faiss.rev_swig_ptr(flat.get_xb(), n * self.dim).reshape(n, self.dim) if n
                        else np.zeros((0, self.dim), np.float32))
        if self._pos is None:
            ids = faiss.vector_to_array(self._faiss.id_map).astype(np.int64)
            pos = np.full(int(ids.max()) + 1 if len(ids) else 0, -1, np.int64)
            pos[ids] = np.arange(len(ids))
            self._pos = pos

    # ---- state ------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        """Vectors held by FAISS, tombstones included."""
        return 0 if self._faiss is None else int(self._faiss.ntotal)

    @property
    def n_live(self) -> int:
        return self._n_added - self._n_removed

    def tombstone_ratio(self) -> float:
        return self._n_removed / self._n_added if self._n_added else 0.0

    # ---- search -----------------------------------------------------------------------------
    def _params(self, exclude: np.ndarray | None, keep: list,
                allowed: np.ndarray | None = None) -> faiss.SearchParameters:
        bitmap = self._live
        if allowed is not None:  # the request's rules, as one bitmap with the live rows
            bits = np.packbits(np.asarray(allowed, bool), bitorder="little")[: len(bitmap)]
            bitmap = bitmap.copy()
            bitmap[: len(bits)] &= bits
            bitmap[len(bits):] = 0
            keep.append(bitmap)
        sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        keep.append(sel)
        if exclude is not None and len(exclude):
            batch = faiss.IDSelectorBatch(np.ascontiguousarray(exclude, dtype=np.int64))
            neg = faiss.IDSelectorNot(batch)
            sel = faiss.IDSelectorAnd(sel, neg)
            keep.extend([batch, neg, sel])
        if self.kind.startswith("hnsw"):
            return faiss.SearchParametersHNSW(sel=sel, efSearch=self.ef_search)
        if self.kind.startswith("ivf"):
            return faiss.SearchParametersIVF(sel=sel, nprobe=self.nprobe)
        return faiss.SearchParameters(sel=sel)

    def search(self, query: np.ndarray, k: int, exclude: np.ndarray | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k live rows by inner product, skipping `exclude` inside the search.

        Args:
            query: shape (dim,) or (1, dim), float32.
            exclude: rows to skip, int64.
            allowed: when given, only rows r with allowed[r] true qualify (bool, indexed by row;
                rows beyond its end do not qualify). Both act inside FAISS as IDSelectors.
        Returns:
            (rows int64, scores float32), best first, fewer than k when fewer rows qualify.
        """
        return self.search_batch(one_query(query, self.dim), k, exclude, allowed)[0]

    def search_batch(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
                     allowed: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """`search` for many queries at once (one FAISS call), the same `exclude` and `allowed` for all.

        Args:
            queries: shape (n, dim), float32.
        Returns:
            One (rows int64, scores float32) pair per query, exactly as `search` gives it.
        """
        q = check_vectors(queries, self.dim, "queries")
        if self._faiss is None or self.n_live == 0 or k <= 0:
            return [(np.zeros(0, np.int64), np.zeros(0, np.float32)) for _ in range(len(q))]
        keep: list = []  # the selectors must outlive the search call
        params = self._params(exclude, keep, allowed)
        scores, rows = self._search(q, int(min(k, self.ntotal)), params)
        out = []
        for r, s in zip(rows, scores):
            ok = r >= 0
            out.append((r[ok].astype(np.int64), s[ok].astype(np.float32)))
        return out

    def _search(self, q: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
        """One FAISS search with `search_threads` OpenMP threads for small batches.

        OpenMP's thread count belongs to the calling thread, so a request thread searching with
        one thread leaves index builds on other threads (and on this one, after) their cores. On
        a busy host a single query split over two threads waits for the second core: 10x slower
        at the tail in benchmarks/README.md (finding 1).
        """
        q = self._padded(q)
        if self.search_threads <= 0 or len(q) > SMALL_BATCH:
            return self._faiss.search(q, k, params=params)
        before = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(self.search_threads)
        try:
            return self._faiss.search(q, k, params=params)
        finally:
            faiss.omp_set_num_threads(before)

    # ---- persistence ------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        if self._faiss is None:
            raise InvalidInputError("cannot save an index that was never built")
        faiss.write_index(self._faiss, str(path))

    def load(self, path: str | Path, live_rows: np.ndarray, n_rows: int, fh=None) -> None:
        """Read the FAISS file (through `fh`, an open handle of it, when given); `live_rows` (from
        the item table) restores the tombstones. The file's layout is checked before FAISS reads
        it, and its rows against the table after (serving/faiss_file); `State.load` then compares
        a sample of its vectors with the store's.

        Raises:
            CorruptStoreError: a file Kindling would not write for this table, naming `path`.
        """
        self._faiss = read_index(Path(path), fh, self.dim)
        held = check_ids(self._faiss, Path(path), n_rows)
        self.kind = _kind_of(self._faiss)  # the file decides, whatever the config would pick now
        # hnsw-sq8 pads to a multiple of 8 (an hnsw-sq8 index written before that has no padding)
        self._pad = self._faiss.d - self.dim
        if self._pad not in ((0, (-self.dim) % 8) if self.kind == "hnsw-sq8" else (0,)):
            raise CorruptStoreError(f"{path}: index has dimension {self._faiss.d}, expected {self.dim}")
        self._pos = self._xb = self._codes = None
        self._refresh_storage()
        self._live = np.zeros(0, dtype=np.uint8)
        self._held = np.zeros(0, dtype=np.uint8)
        self._grow(n_rows)
        self._set_bits(held, True, self._held)
        self._set_bits(np.asarray(live_rows, dtype=np.int64), True)
        self._n_added = int(self._faiss.ntotal)
        self._n_removed = self._n_added - len(live_rows)

    def agrees_on(self, rows: np.ndarray, vectors: np.ndarray) -> bool:
        """Whether the vectors FAISS holds for `rows` are `vectors` (shape (n, dim), float32): exactly
        for flat and hnsw (float storage), to within 8-bit rounding for hnsw-sq8. IVF kinds keep
        no per-row storage to compare with: True."""
        if self.kind in ("ivf", "ivf-pq") or not len(rows):
            return True
        held = self.stored(rows, self.dim) if self.kind != "hnsw-sq8" else self.decoded(rows, self.dim)
        if held is None:
            return False
        scale = float(np.abs(vectors).max()) or 1.0
        tol = 1e-4 if self.kind != "hnsw-sq8" else 0.25  # sq8: clipped rows may be off by more than 1/255
        return bool(np.abs(held - vectors).max() <= tol * scale)


def _pq_subquantizers(dim: int) -> int:
    """The largest divisor of `dim` not above dim // 8 (FAISS's PQ needs one that divides dim)."""
    m = max(1, dim // 8)
    while dim % m:
        m -= 1
    return m


def _kind_of(index: faiss.Index) -> str:
    """The FACTORY kind of a FAISS index read from disk."""
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexHNSWSQ):
        return "hnsw-sq8"
    if isinstance(inner, faiss.IndexHNSW):
        return "hnsw"
    if isinstance(inner, faiss.IndexIVFPQ):
        return "ivf-pq"
    if isinstance(inner, faiss.IndexIVF):
        return "ivf"
    return "flat"

"""Reading a FAISS file the store cannot fully trust: its layout checked before FAISS parses it.

The manifest's checksums catch damage, not a crafted file: someone who can write the store can
also make the checksums agree. FAISS reads a count from the file and allocates that much before it
reads the data (a 20 KB file claiming 4 GB of vectors made FAISS allocate and zero 4 GB before it
noticed the file was short; larger claims get the process killed for memory). So, before FAISS
sees a byte:

- the file must be one of the layouts Kindling writes (an `IndexIDMap` around a flat, HNSW,
  HNSW-SQ8, IVF-flat or IVF-PQ index, inner product), so FAISS's other parsers are never reached;
- the counts Kindling can check cheaply (vectors, IVF lists) must fit in the file's size;
- FAISS's own per-vector allocation limit is set to the file's size for the read (no vector in a
  file can be larger than the file), so no count FAISS reads can allocate more than that.

What FAISS has read is then checked against the store (ids, live rows, a sample of vectors) by
`VectorIndex.load` and `State.load`.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path
from typing import BinaryIO

import faiss
import numpy as np

from ..errors import CorruptStoreError

#: The inner index layouts Kindling writes (serving/index.FACTORY), by their FAISS fourcc.
INNER = {b"IxFI": "flat", b"IHNf": "hnsw", b"IHNs": "hnsw-sq8", b"IwFl": "ivf", b"IwPQ": "ivf-pq"}
_HEADER = struct.Struct("<iqqqBi")  # d, ntotal, two unused int64, is_trained, metric type
_METRIC_IP = 0
#: FAISS's allocation limit is one process-wide setting; reads that set it take turns.
_LIMIT_LOCK = threading.Lock()


class _Reader:
    """Little-endian fields of an open file, by offset; running past the end is CorruptStoreError."""

    def __init__(self, fh: BinaryIO, size: int, path: Path) -> None:
        self.fh, self.size, self.path, self.off = fh, size, path, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.off + n > self.size:
            raise self.error(f"a field at byte {self.off} runs past the end of the file")
        self.fh.seek(self.off)
        out = self.fh.read(n)
        self.off += n
        return out

    def skip(self, n: int) -> None:
        if n < 0 or self.off + n > self.size:
            raise self.error(f"a block of {n:,} bytes at byte {self.off} runs past the end of the file")
        self.off += n

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def header(self, fourcc: bytes) -> tuple[int, int]:
        """An index header after its fourcc `fourcc`: (d, ntotal); inner product only."""
        d, ntotal, _, _, _, metric = _HEADER.unpack(self.take(_HEADER.size))
        if d <= 0 or ntotal < 0 or metric != _METRIC_IP:
            raise self.error(f"{fourcc.decode('latin-1')} header with d={d}, ntotal={ntotal}, metric={metric}")
        return d, ntotal

    def error(self, what: str) -> CorruptStoreError:
        return CorruptStoreError(f"{self.path}: not a readable FAISS index of the kinds Kindling writes ({what}); "
                                 "refused before FAISS read it")


def check_layout(fh: BinaryIO, path: Path, dim: int) -> str:
    """Check the file's layout as far as it decides FAISS's allocations; returns the index kind.

    Args:
        dim: the width the store's index has (a padded hnsw-sq8 index may be up to 7 wider).
    Raises:
        CorruptStoreError: a layout Kindling does not write, or a count the file cannot hold.
    """
    size = os.fstat(fh.fileno()).st_size
    r = _Reader(fh, size, path)
    outer = r.take(4)
    if outer not in (b"IxMp", b"IxM2"):  # IndexIDMap2: stores written by earlier versions
        raise r.error("no IndexIDMap at its start")
    d, ntotal = r.header(outer)
    if not dim <= d < dim + 8 or ntotal * 8 > size:
        raise r.error(f"width {d} for a store of width {dim}, or {ntotal:,} vectors in {size:,} bytes")
    fourcc = r.take(4)
    if fourcc not in INNER:
        raise r.error(f"inner index {fourcc!r}, not one of {', '.join(k.decode() for k in INNER)}")
    if r.header(fourcc) != (d, ntotal):
        raise r.error("the inner index's width or count differs from the id map's")
    if INNER[fourcc].startswith("ivf"):
        _check_ivf(r, d, fourcc == b"IwPQ")
    return INNER[fourcc]


def _check_ivf(r: _Reader, d: int, pq: bool) -> None:
    """IVF: the number of lists must fit the file, in the header and in the lists' own header
    (FAISS allocates every list before it compares the two)."""
    nlist, _nprobe = r.u64(), r.u64()
    if nlist == 0 or nlist * d * 4 > r.size:
        raise r.error(f"{nlist:,} IVF lists of width {d} in {r.size:,} bytes")
    if r.take(4) != b"IxFI" or r.header(b"IxFI") != (d, nlist):
        raise r.error("the IVF quantizer is not a flat index of one centroid per list")
    if r.u64() != nlist * d:
        raise r.error("the IVF centroids do not match the number of lists")
    r.skip(4 * nlist * d)
    if r.take(9) != bytes(9):  # direct map: none (Kindling never makes one)
        raise r.error("an IVF direct map")
    if pq:
        r.skip(1)  # by_residual
        code_size, pq_d, m, nbits = r.u64(), r.u64(), r.u64(), r.u64()
        if pq_d != d or not 0 < m <= d or not 0 < nbits <= 16 or code_size > d:
            raise r.error(f"product quantizer d={pq_d}, M={m}, nbits={nbits}, code size {code_size}")
        if r.u64() != d * (1 << nbits):
            raise r.error("product quantizer centroids of the wrong size")
        r.skip(4 * d * (1 << nbits))
    if r.take(4) != b"ilar" or r.u64() != nlist:
        raise r.error("the inverted lists' header does not repeat the number of lists")


def read_index(path: Path, fh: BinaryIO | None, dim: int) -> faiss.Index:
    """`faiss.read_index` of a Kindling index file, its layout checked first (see the module doc).

    Raises:
        CorruptStoreError: refused by `check_layout`, or FAISS could not read it.
    """
    own = fh is None
    if own:
        try:
            fh = open(path, "rb")
        except OSError as exc:
            raise CorruptStoreError(f"{path}: cannot read the index ({exc.strerror or exc})") from exc
    try:
        check_layout(fh, path, dim)
        fh.seek(0)
        size = os.fstat(fh.fileno()).st_size
        with _LIMIT_LOCK:
            before = faiss.get_deserialization_vector_byte_limit()
            faiss.set_deserialization_vector_byte_limit(size + 1)
            try:
                return faiss.read_index(faiss.PyCallbackIOReader(fh.read))
            except (RuntimeError, MemoryError) as exc:
                raise CorruptStoreError(f"{path}: not a readable FAISS index ({exc})") from exc
            finally:
                faiss.set_deserialization_vector_byte_limit(before)
    finally:
        if own:
            fh.close()


def check_ids(index: faiss.Index, path: Path, n_rows: int) -> np.ndarray:
    """The rows an index read from `path` holds (int64), checked against the item table: each a row
    of the table (0 .. n_rows - 1), none twice, every live row among them; for IVF, every list
    entry a position of the id map. Returns the held rows.

    Raises:
        CorruptStoreError: an index of other rows (another store's, an older generation's).
    """
    if not hasattr(index, "id_map"):
        raise CorruptStoreError(f"{path}: not a Kindling index (no id map)")
    held = faiss.vector_to_array(index.id_map).astype(np.int64)
    if len(held) and (held.min() < 0 or held.max() >= n_rows):
        raise CorruptStoreError(f"{path}: the index holds rows outside 0..{n_rows - 1} (the item table's rows)")
    if len(np.unique(held)) != len(held):
        raise CorruptStoreError(f"{path}: the index holds a row twice")
    inner = faiss.downcast_index(index.index)
    if isinstance(inner, faiss.IndexIVF):
        invlists = inner.invlists
        for lst in range(inner.nlist):
            n = invlists.list_size(lst)
            ids = faiss.rev_swig_ptr(invlists.get_ids(lst), n) if n else np.zeros(0, np.int64)
            if n and (ids.min() < 0 or ids.max() >= len(held)):
                raise CorruptStoreError(f"{path}: IVF list {lst} names positions outside the id map")
    return held

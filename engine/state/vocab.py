"""External string ids <-> dense int64 rows. Rows are never reused, so they stay stable."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import pyarrow as pa

from ..vectors import grown
from .columns import StringColumn, one_array

#: Slots of an empty vocabulary's hash table, and rows its hash array first makes room for.
MIN_SLOTS = 16
MIN_HASHES = 8
#: Ids hashed per step when a vocabulary is built from an Arrow array.
BUILD_CHUNK = 65536
#: The hash of an id. Python's str hash: fast, cached on the str, randomised per process (fine:
#: the table is rebuilt at every open). A module global so a test can force collisions.
_hash = hash


class Vocabulary:
    """Append-only mapping between external ids and rows 0..n-1.

    The ids are a `StringColumn` (a snapshot's ids as one bytes object and offsets; ids added
    since in a list). The id -> row lookup is an open-addressing hash table in numpy: `_slots` (a power of
    two, at least twice the rows) holds rows (-1: empty), probed linearly from `hash(id) & mask`;
    `_hashes` keeps each row's hash, so a probe compares hashes first and decodes an id only to
    confirm, and growth re-places the rows without hashing a string again. Python's str hash is
    randomised per process: nothing here is persisted, the table is rebuilt at every open.
    """

    def __init__(self, ids: Iterable[str] = ()) -> None:
        self._ids = StringColumn()
        self._hashes = np.zeros(0, np.int64)  # hash of each row's id; capacity grows by doubling
        self._place(MIN_SLOTS)
        for i in ids:
            self.add(i)

    @classmethod
    def from_arrow(cls, ids: pa.Array | pa.ChunkedArray) -> "Vocabulary":
        """The vocabulary of `ids` (rows 0..n-1 in order), built in bulk: the ids are hashed a
        chunk at a time and placed with numpy. Raises ValueError if an id is null or repeated,
        TypeError if `ids` are not strings."""
        v = cls()
        base = one_array(ids)
        v._ids = StringColumn(base)
        if base.null_count:
            raise ValueError(f"ids must not be null; row {base.is_null().index(True).as_py()} is")
        n = len(base)
        hashes = np.zeros(max(n, MIN_HASHES), np.int64)
        for lo in range(0, n, BUILD_CHUNK):  # a bounded number of str objects alive at a time
            part = base.slice(lo, BUILD_CHUNK).to_pylist()
            hashes[lo: lo + len(part)] = np.fromiter(map(_hash, part), np.int64, len(part))
        v._hashes = hashes
        v._place(_slots_for(n), check=True)
        return v

    def _place(self, size: int, check: bool = False) -> None:
        """Build `_slots` of `size` (a power of two) with every row, in bulk. With `check`, two
        rows of the same id raise ValueError."""
        n = len(self._ids)
        mask = size - 1
        h = self._hashes[:n]
        slots = np.full(size, -1, np.int32 if n < 2**31 - 1 else np.int64)
        pending = np.arange(n, dtype=np.int64)
        pos = h & mask
        while len(pending):
            free = slots[pos] < 0
            slots[pos[free]] = pending[free]  # several rows at one free slot: one of them lands
            won = np.zeros(len(pending), bool)
            won[free] = slots[pos[free]] == pending[free]
            pending, pos = pending[~won], pos[~won]
            if check and len(pending):  # rows of one id share a probe sequence: they meet here
                same = np.flatnonzero(h[slots[pos]] == h[pending])
                for j in same.tolist():
                    a, b = int(slots[pos[j]]), int(pending[j])
                    if self._ids[a] == self._ids[b]:
                        raise ValueError(f"ids must be unique; {self._ids[a]!r} is at rows {a} and {b}")
            pos = (pos + 1) & mask
        self._slots, self._mask = slots, mask
        # memoryviews: indexing one gives a Python int, faster than a numpy scalar
        self._slot_view, self._hash_view = memoryview(slots), memoryview(self._hashes)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, key: object) -> bool:
        return self.row(key) is not None  # type: ignore[arg-type]

    def add(self, key: str) -> int:
        """The row of `key`, appending it when new."""
        row = self.row(key)
        if row is not None:
            return row
        h = _hash(key)  # cached on the str by row()
        row = len(self._ids)
        self._ids.append(key)
        if row >= len(self._hashes):
            self._hashes = grown(self._hashes, row + 1, MIN_HASHES)
            self._hash_view = memoryview(self._hashes)
        self._hash_view[row] = h
        if 2 * (row + 1) > len(self._slots):  # keep the load at most 1/2: double, re-place in bulk
            self._place(2 * len(self._slots))
        else:
            slots, mask = self._slot_view, self._mask
            i = h & mask
            while slots[i] >= 0:
                i = (i + 1) & mask
            slots[i] = row
        return row

    def row(self, key: str) -> int | None:
        """The row of `key`; None if it has none. On the path of every recorded event: one
        call, no numpy scalar (a few hundred ns)."""
        h = _hash(key)
        slots, hashes, mask = self._slot_view, self._hash_view, self._mask
        i = h & mask
        while True:
            r = slots[i]
            if r < 0:
                return None
            if hashes[r] == h:
                ids = self._ids
                if r < ids._n_base and key.__class__ is str:  # StringColumn.equals, inlined
                    o = ids._offsets
                    try:
                        if ids._data[o[r]:o[r + 1]] == key.encode():
                            return r
                    except UnicodeEncodeError:  # a lone surrogate: no stored (UTF-8) id equals it
                        pass
                elif ids[r] == key:
                    return r
            i = (i + 1) & mask

    def id(self, row: int) -> str:
        return self._ids[row]

    def ids(self) -> list[str]:
        return self._ids.tolist()

    def to_arrow(self) -> pa.Array:
        """Every id in row order as one pa.string() array; it holds them from now on (the ids
        added since are folded in)."""
        return self._ids.compact()


def _slots_for(n: int) -> int:
    """The smallest power of two of at least 2 * n slots (and MIN_SLOTS)."""
    return max(MIN_SLOTS, 1 << max(2 * n - 1, 1).bit_length())

"""A column of strings kept compact: the snapshot's rows as UTF-8 bytes, changes in Python.

ItemTable keeps its vectors as the snapshot's (mapped) rows plus a small tail of rows added since;
`StringColumn` does the same for titles, texts and ids. The rows that came from the snapshot stay
as the UTF-8 bytes and offsets of the Arrow array the snapshot was read into (one bytes object
and a numpy array: 4 B a row plus the text, against ~57 B plus the text for a Python str and its
list slot); rows appended since live in a Python list and snapshot rows replaced since in a dict.
Reading a row decodes it to a new str (equal to the one a list would hold, not the same object).
"""

from __future__ import annotations

import operator
from collections.abc import Iterator

import numpy as np
import pyarrow as pa

#: Bytes a pa.string() array's int32 offsets can address; a larger column becomes large_string.
MAX_STRING_BYTES = 2**31 - 1

_MISSING = object()


def one_array(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    """`values` as a single pa.string() or pa.large_string() array (chunks combined, other
    string-like types cast). Raises TypeError for a column that is not strings."""
    if isinstance(values, pa.ChunkedArray):
        chunks = values.chunks
        if not chunks:
            values = pa.array([], values.type)
        elif len(chunks) == 1:
            values = chunks[0]
        else:
            size = sum(c.nbytes for c in chunks)
            if size > MAX_STRING_BYTES:
                values = values.cast(pa.large_string())
            values = pa.concat_arrays(values.chunks)
    t = values.type
    if not (pa.types.is_string(t) or pa.types.is_large_string(t)):
        if not (pa.types.is_null(t) or pa.types.is_string_view(t) or
                (pa.types.is_dictionary(t) and _is_text(t.value_type))):
            raise TypeError(f"a string column must hold strings; got {t}")
        values = values.cast(pa.large_string() if values.nbytes > MAX_STRING_BYTES else pa.string())
    return values


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


class StringColumn:
    """Strings (or None, for a null of the snapshot) of rows 0..n-1.

    Index it like the list it replaces: `col[row]`, `col[row] = s`, `col.append(s)`, `len(col)`,
    iteration. `to_arrow` gives every row as one pa.string() array; `compact` also folds the
    tail and the changes into it, so they never outgrow what changed since the last save.
    """

    def __init__(self, base: pa.Array | pa.ChunkedArray | None = None) -> None:
        self._tail: list[str | None] = []  # rows from len(base) on
        self._changed: dict[int, str | None] = {}  # base rows replaced since
        self._install(None if base is None else one_array(base))

    def _install(self, base: pa.Array | None) -> None:
        """Keep `base`'s rows as its UTF-8 bytes (one Python bytes object) and offsets (numpy);
        the Arrow array itself is not kept. Its nulls become changed rows holding None."""
        self._tail, self._changed = [], {}
        self._type = pa.string()
        self._data = b""
        self._offsets_np = np.zeros(1, np.int32)
        if base is not None and len(base):
            bufs = base.buffers()
            if pa.types.is_large_string(base.type):
                self._type, dtype = pa.large_string(), np.int64
            else:
                dtype = np.int32
            offsets = np.frombuffer(bufs[1], dtype)[base.offset: base.offset + len(base) + 1]
            lo, hi = int(offsets[0]), int(offsets[-1])
            self._data = bufs[2].slice(lo, hi - lo).to_pybytes() if hi > lo else b""
            self._offsets_np = offsets - dtype(lo)  # a copy: no Arrow buffer stays alive
            if base.null_count:
                for r in np.flatnonzero(base.is_null().to_numpy(zero_copy_only=False)).tolist():
                    self._changed[r] = None
        self._n_base = len(self._offsets_np) - 1
        # Indexing a memoryview gives a Python int: faster per row than a numpy scalar
        self._offsets = memoryview(self._offsets_np)

    def _base(self) -> pa.Array:
        """The base rows as an Arrow array (sharing this column's memory; no nulls)."""
        return pa.Array.from_buffers(self._type, self._n_base,
                                     [None, pa.py_buffer(self._offsets_np), pa.py_buffer(self._data)])

    def equals(self, row: int, value: str) -> bool:
        """`self[row] == value` for a row in 0..len-1, without making a str of a base row."""
        if row < self._n_base and value.__class__ is str and row not in self._changed:
            o = self._offsets
            start = o[row]
            try:
                raw = value.encode("utf-8")
            except UnicodeEncodeError:  # a lone surrogate: no stored (valid UTF-8) row equals it
                return False
            return o[row + 1] - start == len(raw) and self._data.startswith(raw, start)
        return self[row] == value

    def __len__(self) -> int:
        return self._n_base + len(self._tail)

    def _row(self, row) -> int:
        """`row` as an int in 0..len-1 (negative counts from the end, like a list's)."""
        row = operator.index(row)
        if row < 0:
            row += len(self)
            if row < 0:
                raise IndexError("row out of range")
        return row

    def __getitem__(self, row):
        if row.__class__ is not int:
            if isinstance(row, slice):
                return [self[i] for i in range(*row.indices(len(self)))]
            row = operator.index(row)
        if 0 <= row < self._n_base:
            if self._changed:
                value = self._changed.get(row, _MISSING)
                if value is not _MISSING:
                    return value
            o = self._offsets
            return self._data[o[row]:o[row + 1]].decode()
        if row < 0:
            return self[self._row(row)]
        return self._tail[row - self._n_base]  # IndexError past the end

    def __setitem__(self, row, value: str | None) -> None:
        row = self._row(row)
        if row < self._n_base:
            self._changed[row] = value
        else:
            self._tail[row - self._n_base] = value

    def append(self, value: str | None) -> None:
        self._tail.append(value)

    def __iter__(self) -> Iterator[str | None]:
        step = 65536  # a bounded slice of the base at a time, not one str per row at once
        base = self._base()
        for lo in range(0, self._n_base, step):
            values = base.slice(lo, step).to_pylist()
            if self._changed:
                for r, v in self._changed.items():
                    if lo <= r < lo + step:
                        values[r - lo] = v
            yield from values
        yield from self._tail

    def tolist(self) -> list[str | None]:
        return list(self)

    def to_arrow(self) -> pa.Array:
        """Every row as one pa.string() array (the same values `pa.array(list(self), pa.string())`
        gives)."""
        if not self._n_base:  # no pa.array for an empty table: its first call imports pandas (~1 s)
            return pa.array(self._tail, pa.string()) if self._tail else self._base()
        base = self._base() if self._type == pa.string() else self._base().cast(pa.string())
        if not self._changed and not self._tail:
            return base
        changed = sorted(self._changed)
        extra = pa.array([self._changed[r] for r in changed] + self._tail, pa.string())
        both = pa.concat_arrays([base, extra])
        if not changed:
            return both
        take = np.arange(len(self), dtype=np.int64)
        take[changed] = self._n_base + np.arange(len(changed))
        take[self._n_base:] = self._n_base + len(changed) + np.arange(len(self._tail))
        return both.take(pa.array(take))

    def compact(self) -> pa.Array:
        """`to_arrow()`, which from now on holds every row (the tail and changes are dropped)."""
        out = self.to_arrow()
        if self._tail or self._changed:
            self._install(out)
        return out


__all__ = ["StringColumn", "one_array"]

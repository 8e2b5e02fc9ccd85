"""The in-memory catalog: item records, tombstones, raw text vectors and online statistics.

The raw text vectors are kept once: rows that came from the snapshot stay in its vectors file,
memory-mapped copy-on-write (see storage/mapped.py), and rows added since live in a small
in-memory tail. A save writes both into the next snapshot and maps that (`install_vectors`), so
the tail never outgrows what was added since the last save. Ids, titles and texts are kept the
same way (see columns.py): the snapshot's stay as the UTF-8 bytes and offsets of the Arrow arrays
it was read into, rows added or replaced since in small Python containers, folded in by the next
save (`to_arrow`).
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..types import Item
from ..vectors import grown
from .columns import StringColumn
from .vocab import Vocabulary

ITEM_SCHEMA = pa.schema([
    ("item_id", pa.string()), ("title", pa.string()), ("text", pa.string()),
    ("categories", pa.list_(pa.string())), ("added_at", pa.int64()), ("removed", pa.bool_()),
    ("impressions", pa.float64()), ("clicks", pa.float64()), ("skips", pa.float64()),
    ("expires_at", pa.int64()), ("pop_clicks", pa.float64()), ("pop_t", pa.int64()),
])
#: Columns a store written by an earlier version may lack (read as "never expires", no decayed clicks).
OPTIONAL_ITEM_COLUMNS = ("expires_at", "pop_clicks", "pop_t")
#: `expires_at` of an item that never expires.
NEVER = np.iinfo(np.int64).max


#: madvise(2)'s MADV_PAGEOUT (linux/mman.h; Python's mmap module names it only when built
#: against headers that have it).
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)


def _mapping_of(arr: np.ndarray) -> "mmap.mmap | None":
    """The mmap behind `arr` (a view of an np.memmap), or None."""
    obj = arr
    while obj is not None:
        if isinstance(obj, mmap.mmap):
            return obj
        obj = getattr(obj, "_mmap", None) or getattr(obj, "base", None)
    return None


#: Rows the arrays first make room for: a catalog of a few items should not regrow per add.
MIN_CAPACITY = 1024


class ItemTable:
    """Rows 0..n-1 of every item ever added; removed ones stay as tombstones so rows never move."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.vocab = Vocabulary()
        self.titles = StringColumn()  # indexed like a list of str
        self.texts = StringColumn()
        self.categories: list[tuple[str, ...]] = []
        self.added_at = np.zeros(0, np.int64)
        self.removed = np.zeros(0, bool)
        self.impressions = np.zeros(0, np.float64)
        self.clicks = np.zeros(0, np.float64)
        self.skips = np.zeros(0, np.float64)
        self.expires_at = np.zeros(0, np.int64)  # NEVER when the item does not expire
        self.pop_clicks = np.zeros(0, np.float64)  # clicks decayed to pop_t (popularity_half_life_s)
        self.pop_t = np.zeros(0, np.int64)  # the time of the item's latest click
        self._pop_now: int | None = None  # max(pop_t), kept as clicks come (None: recount)
        self._soonest = NEVER  # no row expires before this (a bound: an upsert may leave it early)
        self._base = np.zeros((0, dim), np.float32)  # rows 0..len-1: the snapshot's, usually mapped
        self._tail = np.zeros((0, dim), np.float32)  # rows added since, from len(_base) on
        self._n = 0
        self._by_category: dict[str, set[int]] = {}  # category -> rows carrying it (for filters)

    def __len__(self) -> int:
        return self._n

    @property
    def vectors(self) -> np.ndarray:
        """Raw text vectors of all rows: shape (n, dim), float32.

        A view of the mapped snapshot rows while nothing was added since the snapshot; a copy of
        every row otherwise. Per-request code asks `vector_rows` for the rows it needs instead.
        """
        base = len(self._base)
        if self._n <= base:
            return self._base[: self._n]
        return np.concatenate([self._base, self._tail[: self._n - base]])

    def vector_rows(self, rows: np.ndarray) -> np.ndarray:
        """Raw text vectors of `rows` (item rows, int): shape (len(rows), dim), float32, a copy."""
        rows = np.asarray(rows, np.int64)
        base = len(self._base)
        if self._n <= base or not len(rows) or rows.max() < base:
            return self._base[rows]
        out = np.empty((len(rows), self.dim), np.float32)
        old = rows < base
        out[old] = self._base[rows[old]]
        out[~old] = self._tail[rows[~old] - base]
        return out

    def release_vector_pages(self) -> None:
        """After a pass over every row (a trained store's open, an index rebuild, `fit`): ask the
        kernel to take the mapped snapshot vectors' pages out of this process (MADV_PAGEOUT,
        Linux 5.4+). They are clean file pages, read again from the page cache or the disk on the
        next touch; a page an upsert wrote stays (private memory is never paged out to nowhere).
        Without the advice a single pass leaves the whole file resident in the process (RssFile
        ~1.0x the raw vectors). A no-op where the vectors are not mapped or the kernel says no."""
        mm = _mapping_of(self._base)
        if mm is not None:
            try:
                mm.madvise(MADV_PAGEOUT)
            except (OSError, ValueError):  # an older kernel (EINVAL), or a closed map
                pass

    def install_vectors(self, vectors: np.ndarray) -> None:
        """Take `vectors` (shape (len(self), dim), float32, writable: a copy-on-write map of the
        snapshot just saved) as every row's vectors; the in-memory tail is dropped."""
        if vectors.shape != (self._n, self.dim) or vectors.dtype != np.float32:
            raise ValueError(f"vectors must be float32 with shape ({self._n}, {self.dim}); "
                             f"got {vectors.dtype} {vectors.shape}")
        self._base, self._tail = vectors, np.zeros((0, self.dim), np.float32)

    def _set_vector(self, row: int, vec: np.ndarray) -> None:
        base = len(self._base)
        if row < base:  # an upsert of a snapshot row: the map copies that one page on write
            self._base[row] = vec
        else:
            self._tail = grown(self._tail, row - base + 1, MIN_CAPACITY)
            self._tail[row - base] = vec

    def live_row(self, item_id: str) -> int | None:
        row = self.vocab.row(item_id)
        return None if row is None or self.removed[row] else row

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(~self.removed[: self._n])

    def add_decayed_click(self, row: int, t: int, half_life: float) -> None:
        """Count a click at time `t` (unix seconds) into row's decayed clicks, which are kept as
        of its latest click: the sum over clicks of 2 ** -((pop_t - t_click) / half_life)."""
        if t >= self.pop_t[row]:
            self.pop_clicks[row] = self.pop_clicks[row] * 2.0 ** (-(t - self.pop_t[row]) / half_life) + 1.0
            self.pop_t[row] = t
            if self._pop_now is not None and t > self._pop_now:
                self._pop_now = t
        else:  # an older click arriving late (an import): it weighs as of the latest one
            self.pop_clicks[row] += 2.0 ** (-(self.pop_t[row] - t) / half_life)

    def decayed_clicks(self, rows: np.ndarray, half_life: float) -> np.ndarray:
        """Rows' clicks decayed to the store's latest click time: shape (len(rows),), float64."""
        if self._pop_now is None:  # one pass after a load or an upsert, not one per call
            self._pop_now = int(self.pop_t[: self._n].max()) if self._n else 0
        now = self._pop_now
        return self.pop_clicks[rows] * np.exp2(-(now - self.pop_t[rows]) / half_life)

    def expired(self, now: int) -> np.ndarray | None:
        """Rows whose `expires_at` has come (at or before `now`): shape (len(self),), bool; None
        when no live row has expired."""
        if now < self._soonest:  # the common case, a catalog without expiry: no pass over the rows
            return None
        mask = self.expires_at[: self._n] <= now
        mask &= ~self.removed[: self._n]
        return mask if mask.any() else None

    def category_mask(self, categories: Iterable[str]) -> np.ndarray:
        """Rows carrying at least one of `categories`: shape (len(self),), bool."""
        mask = np.zeros(self._n, bool)
        for c in categories:
            rows = self._by_category.get(c)
            if rows:
                mask[np.fromiter(rows, np.int64, len(rows))] = True
        return mask

    def _set_categories(self, row: int, categories: tuple[str, ...]) -> None:
        if row < len(self.categories):
            for c in self.categories[row]:
                self._by_category.get(c, set()).discard(row)
            self.categories[row] = categories
        else:
            self.categories.append(categories)
        for c in categories:
            self._by_category.setdefault(c, set()).add(row)

    def item(self, row: int) -> Item:
        e = int(self.expires_at[row])
        return Item(self.vocab.id(row), self.titles[row], self.texts[row], self.categories[row],
                    None if e == NEVER else e)

    def _reserve(self, n: int) -> None:
        for name in ("added_at", "removed", "impressions", "clicks", "skips", "expires_at", "pop_clicks", "pop_t"):
            setattr(self, name, grown(getattr(self, name), n, MIN_CAPACITY))

    def append(self, item: Item, vec: np.ndarray, now: int) -> int:
        """Add a new row, or revive a removed id in place (same row, fresh record and stats)."""
        row = self.vocab.row(item.item_id)
        if row is None:
            self._reserve(self._n + 1)
            row = self.vocab.add(item.item_id)
            self.titles.append(item.title)
            self.texts.append(item.text)
            self._set_categories(row, tuple(item.categories))
            self._n += 1
        else:
            self.titles[row], self.texts[row] = item.title, item.text
            self._set_categories(row, tuple(item.categories))
            self.impressions[row] = self.clicks[row] = self.skips[row] = self.pop_clicks[row] = 0.0
            self.pop_t[row] = 0
            self._pop_now = None
        self.added_at[row], self.removed[row] = now, False
        self.expires_at[row] = NEVER if item.expires_at is None else item.expires_at
        self._soonest = min(self._soonest, int(self.expires_at[row]))
        self._set_vector(row, vec)
        return row

    def to_arrow(self) -> pa.Table:
        """Every row as a table of ITEM_SCHEMA. The ids, titles and texts added or replaced since
        the last call are folded into the Arrow arrays the table is made of (memory holds one
        copy of each string, however often the store is saved)."""
        n = self._n
        return pa.Table.from_arrays([
            self.vocab.to_arrow(), self.titles.compact(),
            self.texts.compact(), pa.array([list(c) for c in self.categories],
                                                         pa.list_(pa.string())),
            pa.array(self.added_at[:n]), pa.array(self.removed[:n]), pa.array(self.impressions[:n]),
            pa.array(self.clicks[:n]), pa.array(self.skips[:n]),
            pa.array(self.expires_at[:n], mask=self.expires_at[:n] == NEVER),
            pa.array(self.pop_clicks[:n]), pa.array(self.pop_t[:n]),
        ], schema=ITEM_SCHEMA)

    @classmethod
    def from_arrow(cls, table: pa.Table, vectors: np.ndarray) -> "ItemTable":
        """The table of `table`'s rows; `vectors` (shape (rows, dim), float32) is kept, not copied,
        unless it is read-only (a map of the snapshot is writable: copy-on-write)."""
        t = cls(vectors.shape[1])
        n = table.num_rows
        t._reserve(n)
        t.vocab = Vocabulary.from_arrow(table.column("item_id"))
        t.titles, t.texts = StringColumn(table.column("title")), StringColumn(table.column("text"))
        cats = table.column("categories")
        has = np.flatnonzero(pc.list_value_length(cats).fill_null(0).to_numpy(zero_copy_only=False))
        t.categories = [()] * n  # the one empty tuple; only rows with categories make objects
        for r, c in zip(has.tolist(), cats.take(has).to_pylist()):
            t.categories[r] = tuple(c)
            for name in t.categories[r]:
                t._by_category.setdefault(name, set()).add(r)
        for name in ("added_at", "removed", "impressions", "clicks", "skips"):
            getattr(t, name)[:n] = table.column(name).to_numpy(zero_copy_only=False)
        for name in ("pop_clicks", "pop_t"):
            if name in table.column_names:
                getattr(t, name)[:n] = table.column(name).to_numpy(zero_copy_only=False)
        t.expires_at[:n] = NEVER
        if "expires_at" in table.column_names:
            t.expires_at[:n] = table.column("expires_at").fill_null(NEVER).to_numpy(zero_copy_only=False)
            t._soonest = int(t.expires_at[:n].min()) if n else NEVER
        t._n = n
        vectors = np.asarray(vectors, np.float32)
        t.install_vectors(vectors if vectors.flags.writeable else vectors.copy())
        return t

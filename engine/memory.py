"""Memory the engine's bulk steps freed, given back to the operating system.

Opening a snapshot reads its tables through Arrow and builds the index, the lexicon and the
tower's vectors; a save writes the tables through Arrow; `fit` and an index rebuild make large
temporary arrays. Each of those ends here (Core._load, Core._adopt, State.rebuild_index).
Once freed, that memory stays in the process unless the allocators are asked to return it:
Arrow's pool (mimalloc or jemalloc) caches what it freed, and glibc's malloc keeps freed pages
of its heaps until `malloc_trim`. On a 100k-item trained store that was ~50 MB (500 B an item,
a third of the raw vectors) held after `Engine.open` (benchmarks/README.md, "Performance II").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_LIBC: ctypes.CDLL | None | bool = False  # False: not looked up yet


def _libc() -> ctypes.CDLL | None:
    global _LIBC
    if _LIBC is False:
        _LIBC = None
        if sys.platform.startswith("linux"):
            try:
                libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                _LIBC = libc if hasattr(libc, "malloc_trim") else None  # glibc only (not musl)
            except OSError:
                _LIBC = None
    return _LIBC or None


def release_free_memory() -> None:
    """Return memory freed by Arrow's pool and by malloc to the OS (a no-op where neither can).
    Costs a walk of malloc's heaps (0.03-0.13 ms after opening a 100k-item store here); it is
    meant for the end of bulk steps, not for every request."""
    try:
        import pyarrow as pa

        pa.default_memory_pool().release_unused()
    except (ImportError, AttributeError):
        pass
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


__all__ = ["release_free_memory"]

"""The vector backend contract the engine calls, and the two that implement it.

`index.VectorIndex` (FAISS, the default, in process, saved as a file in each snapshot) and
`milvus.MilvusIndex` (a Milvus collection: Milvus Lite in a local file, or a server). Both take
int64 item rows and return rows best first; removed rows and the rows a request excludes or
filters out are skipped inside the search, so k rows come back whenever k qualify.
`tests/test_backends.py` runs one contract suite over both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..config import INDEX_BACKENDS, IndexBackend  # noqa: F401  (re-exported)


class VectorBackend(Protocol):
    """What `State`, the ranker and the queries need of an index (see index.VectorIndex for the
    full docstrings)."""

    backend: str  #: "faiss" or "milvus"
    dim: int
    kind: str  #: a config.INDEX_KINDS value but "auto"
    in_place_upsert: bool  #: `upsert` can replace held rows (else the engine rebuilds)

    def build(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Replace the whole index with these rows (shape (n,), int64; (n, dim), float32)."""

    def add(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Index rows new to this index; a held row is InvalidInputError."""

    def upsert(self, rows: np.ndarray, vectors: np.ndarray) -> None:
        """Index rows, replacing the vectors of held ones."""

    def remove(self, rows: Sequence[int] | np.ndarray) -> None:
        """Make rows unsearchable; unknown rows are ignored."""

    def contains(self, rows: np.ndarray) -> np.ndarray:
        """Which rows are searchable (bool, one per row)."""

    def holds(self, rows: np.ndarray) -> np.ndarray:
        """Which rows have a stored vector, removed ones included where the backend keeps them."""

    def stored(self, rows: np.ndarray, width: int | None = None) -> np.ndarray | None:
        """The held float vectors of `rows` from the backend's own memory, or None (see
        VectorIndex.stored; a remote backend answers None)."""

    def decoded(self, rows: np.ndarray, width: int | None = None) -> np.ndarray | None:
        """The vectors a compressed index's codes stand for, of `rows`, or None (see
        VectorIndex.decoded; a remote backend answers None)."""

    @property
    def ntotal(self) -> int: ...

    @property
    def n_live(self) -> int: ...

    def tombstone_ratio(self) -> float: ...

    def search(self, query: np.ndarray, k: int, exclude: np.ndarray | None = None,
               allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (rows int64, scores float32) by inner product; see VectorIndex.search."""

    def search_batch(self, queries: np.ndarray, k: int, exclude: np.ndarray | None = None,
                     allowed: np.ndarray | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """One (rows, scores) pair per query, as `search` gives each."""

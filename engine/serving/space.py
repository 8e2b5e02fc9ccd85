"""The retrieval space: each item's vector and bias as the item tower places it, what the index
holds ([tau * v, b] per row) and a user's query against it.

Before any fit the space is the text space (the tower is the identity, every bias 0) and the index
holds the raw text vectors, which are then read from the index itself (`item_vectors`). After a
fit, every item has its tower vector and bias, warm items their learned residuals on top
(`WarmResiduals`).
"""

from __future__ import annotations

import numpy as np

from ..models.projection import Projection
from ..state.items import ItemTable
from ..state.users import UserState, apply_click
from ..vectors import grown, normalise, outside
from .backend import VectorBackend


class RetrievalSpace:
    """Item vectors and biases in retrieval space, cached for every row of the item table."""

    def __init__(self) -> None:
        self.projection: Projection | None = None
        self.items: ItemTable | None = None
        self._vecs: np.ndarray | None = None      # retrieval vectors when trained (else the raw ones)
        self.bias = np.zeros(0, np.float32)       # each row's learned bias (0 until trained)
        self.warm: WarmResiduals | None = None    # the towers' learned residuals of warm items
        #: The store's index (set by State): untrained, the vectors it holds are the raw ones
        self.index: VectorBackend | None = None

    @property
    def trained(self) -> bool:
        return self.projection is not None and self.projection.trained

    @property
    def index_dim(self) -> int:
        return self.projection.d_out + 1

    def _rows_capacity(self, n: int) -> None:
        if self._vecs is not None:
            self._vecs = grown(self._vecs, n)
        self.bias = grown(self.bias, n)

    def refresh(self, items: ItemTable, proj: Projection) -> None:
        """Recompute every item's retrieval vector and bias (after open or training)."""
        self.items, self.projection = items, proj
        n = len(items)
        self._rows_capacity(n)
        if proj.trained:
            warm = self.warm.below(n) if self.warm is not None else WarmResiduals.empty(proj.d_out)
            self._vecs = proj.transform(items.vectors, warm.residual, warm.rows)
            self.bias = proj.bias(items.vectors, warm.bias, warm.rows)
            items.release_vector_pages()  # one pass over every row: the file need not stay resident
        else:
            self._vecs, self.bias = None, np.zeros(n, np.float32)

    def added(self, items: ItemTable, proj: Projection, rows: np.ndarray) -> None:
        """New (or replaced) `rows` of `items`: their vectors and biases from text alone."""
        self.items, self.projection = items, proj
        self._rows_capacity(len(items))
        if self.warm is not None:  # a new (or replaced) item has no audience yet
            self.warm = self.warm.without(rows)
        if self._vecs is not None:
            self._vecs[rows] = proj.transform(items.vector_rows(rows))
        self.bias[rows] = proj.bias(items.vector_rows(rows))

    def item_vectors(self, rows: np.ndarray) -> np.ndarray:
        """Unit retrieval vectors of `rows`: shape (len(rows), d_out), float32.

        Untrained, these are the raw text vectors, and the index holds them bit for bit ([v, 0]:
        tau is 1): they are read from the index's own storage when it keeps floats (flat, hnsw),
        so serving never touches the mapped vectors file and the index is the one copy in memory.
        Otherwise, and for rows the index does not hold, from the item table (`_own_vectors`)."""
        rows = np.asarray(rows, dtype=np.int64)
        held = self.index.stored(rows, self.items.dim) if self._index_holds_raw() else None
        return held if held is not None else self._own_vectors(rows)

    def scoring_vectors(self, rows: np.ndarray) -> np.ndarray:
        """`item_vectors` for scoring a request's candidates: on a compressed index (hnsw-sq8),
        untrained, the vectors its codes stand for, decoded from the index (what its search
        scored; cosine ~0.9999 to the raw ones), so serving keeps no float copy resident: reading
        the raw rows pulled the mapped vectors file into the process (0.92x the raw vectors at
        1M after 1,000 requests). State changes (a click's step, a user rebuilt from history)
        keep the exact vectors of `item_vectors`."""
        codes = (self.index.decoded(np.asarray(rows, dtype=np.int64), self.items.dim)
                 if self._index_holds_raw() else None)
        return codes if codes is not None else self.item_vectors(rows)

    def _index_holds_raw(self) -> bool:
        """Untrained, the index holds each item's raw text vector as [v, 0] (see item_vectors)."""
        return self._vecs is None and self.index is not None and self.index.dim == self.items.dim + 1

    def _own_vectors(self, rows: np.ndarray) -> np.ndarray:
        """`item_vectors` from the source of truth: the item table (untrained, mapped; see
        ItemTable) or the tower's vectors, never the index (which a rebuild is replacing)."""
        if self._vecs is None:
            return self.items.vector_rows(rows)
        return np.ascontiguousarray(self._vecs[rows])

    def index_vectors(self, rows: np.ndarray) -> np.ndarray:
        """What FAISS stores: [tau * v, b], so <[u, 1], .> = tau <u, v> + b (the tower score)."""
        tau = self.projection.tau
        rows = np.asarray(rows, dtype=np.int64)
        return np.ascontiguousarray(np.hstack([tau * self._own_vectors(rows), self.bias[rows, None]]),
                                    dtype=np.float32)

    def query(self, u: np.ndarray, n: int = 0) -> np.ndarray:
        """[u * tau(n) / tau_ref, 1]: the index holds tau_ref * v, the user's history sets tau(n)."""
        scale = self.projection.tau_for(n) / self.projection.tau
        return np.append(scale * u, np.float32(1.0)).astype(np.float32)

    def similar_query(self, row: int) -> np.ndarray:
        return np.append(self.item_vectors(np.array([row]))[0], np.float32(0.0)).astype(np.float32)

    def set_towers(self, proj: Projection, residual: np.ndarray, item_bias: np.ndarray) -> None:
        self.projection, self.warm = proj, WarmResiduals.from_dense(residual, item_bias)

    def tensors(self, proj: Projection) -> dict[str, np.ndarray]:
        """The tower `proj` and the warm items' residuals, as the models file holds them."""
        out = dict(proj.tensors())
        if self.warm is not None:
            out.update(self.warm.below(len(self.items) if self.items is not None else 0).tensors())
        return out

    def load(self, tensors: dict[str, np.ndarray], d_text: int) -> Projection:
        """The tower and residuals of a models file (`refresh` then computes the vectors)."""
        self.projection = Projection.from_tensors(tensors, d_text)
        self.warm = WarmResiduals.from_tensors(tensors)
        return self.projection


class WarmResiduals:
    """The item tower's learned residuals (vector and bias), held for the warm items only: the
    rows that had clicks when the towers were fit (sorted), their residual vectors and biases.

    Every other item's residual is zero, so a dense (items, d_out) array spent 4 * d_out bytes
    an item (512 at d_out 128: a third of the raw vectors again) mostly on zeros. Saved as
    `tower.warm_rows`, `tower.warm_residual`, `tower.warm_bias`; a dense `tower.residual` and
    `tower.item_bias` (stores written before) load too.
    """

    def __init__(self, rows: np.ndarray, residual: np.ndarray, bias: np.ndarray) -> None:
        self.rows = np.asarray(rows, np.int64)
        self.residual = np.asarray(residual, np.float32).reshape(len(self.rows), -1)
        self.bias = np.asarray(bias, np.float32)

    @classmethod
    def empty(cls, dim: int) -> "WarmResiduals":
        return cls(np.zeros(0, np.int64), np.zeros((0, dim), np.float32), np.zeros(0, np.float32))

    @classmethod
    def from_dense(cls, residual: np.ndarray, bias: np.ndarray) -> "WarmResiduals":
        """From one residual row and bias per item (zero for the cold ones)."""
        warm = np.flatnonzero(np.asarray(residual).any(axis=1) | (np.asarray(bias) != 0))
        return cls(warm, residual[warm], bias[warm])

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray]) -> "WarmResiduals | None":
        if "tower.warm_rows" in t:
            return cls(t["tower.warm_rows"], t["tower.warm_residual"], t["tower.warm_bias"])
        if "tower.residual" in t:
            return cls.from_dense(t["tower.residual"], t["tower.item_bias"])
        return None

    def tensors(self) -> dict[str, np.ndarray]:
        return {"tower.warm_rows": self.rows, "tower.warm_residual": self.residual, "tower.warm_bias": self.bias}

    def below(self, n: int) -> "WarmResiduals":
        """Those of rows < n."""
        return self._kept(self.rows < n)

    def without(self, rows: np.ndarray) -> "WarmResiduals":
        """Those of rows other than `rows` (items replaced or added: no audience yet)."""
        return self._kept(outside(self.rows, np.sort(np.asarray(rows, np.int64))))

    def _kept(self, keep: np.ndarray) -> "WarmResiduals":
        return self if keep.all() else WarmResiduals(self.rows[keep], self.residual[keep], self.bias[keep])


def user_from_clicks(rows: list[int], vecs: np.ndarray, profile: np.ndarray | None, min_step: float,
                     profile_weight: float = 1.0, profile_text: str | None = None,
                     profile_vec: np.ndarray | None = None) -> UserState:
    """A user state built click by click with the online rule, as a stored user with the same
    profile and clicks has it: the vector starts at `profile` (the profile in retrieval space),
    which counts `profile_weight` clicks; the state keeps `profile_text` and `profile_vec` (its
    text-space vector). For training examples and stateless requests."""
    u = UserState(vector=np.zeros(vecs.shape[1], np.float32) if profile is None else normalise(profile))
    if profile is not None and profile_vec is not None:
        u.profile, u.profile_vec = profile_text, profile_vec
    for r, v in zip(rows, vecs):
        apply_click(u, v, min_step, profile_weight)
        u.clicks.append(int(r))
    return u


__all__ = ["RetrievalSpace", "WarmResiduals", "user_from_clicks"]

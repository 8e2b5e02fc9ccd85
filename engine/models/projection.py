"""The item tower at serving time: raw text vector -> retrieval vector and popularity bias.

Untrained it is the identity with zero bias. Trained (see towers.py) it is
`v = normalise(e W + r_item)` and `b = e . w + c + c_item`, where the per-item residuals r_item and
c_item exist only for items that had clicks at training time (the Ranker keeps them by row), so a
cold item is placed by its text alone.
"""

from __future__ import annotations

import numpy as np

from ..vectors import normalise_rows

#: History lengths where the temperature changes: one learned tau per bucket [edge_i, edge_i+1).
#: A single click says less than twenty, so the similarity term earns less weight against the bias.
TAU_EDGES = np.array([0, 1, 2, 3, 4, 6, 10, 20])


def tau_bucket(n: int | np.ndarray) -> np.ndarray:
    """Bucket of history length(s) `n`."""
    return np.searchsorted(TAU_EDGES, n, side="right") - 1


class Projection:
    def __init__(self, d_in: int, weight: np.ndarray | None = None, bias_weight: np.ndarray | None = None,
                 bias_const: float = 0.0, taus: np.ndarray | None = None) -> None:
        self.d_in = d_in
        self.weight = None if weight is None else np.ascontiguousarray(weight, np.float32)
        self.bias_weight = None if bias_weight is None else np.ascontiguousarray(bias_weight, np.float32)
        self.bias_const = float(bias_const)
        self.taus = np.ones(1, np.float32) if taus is None else np.asarray(taus, np.float32).reshape(-1)

    @property
    def tau(self) -> float:
        """The reference temperature baked into the index (the largest one)."""
        return float(self.taus.max())

    def tau_for(self, n: int) -> float:
        """The temperature for a user whose history weighs `n` clicks."""
        if len(self.taus) == 1:
            return float(self.taus[0])
        return float(self.taus[int(tau_bucket(n))])

    @property
    def trained(self) -> bool:
        return self.weight is not None

    @property
    def d_out(self) -> int:
        return self.d_in if self.weight is None else int(self.weight.shape[1])

    def transform(self, raw: np.ndarray, residual: np.ndarray | None = None,
                  rows: np.ndarray | None = None) -> np.ndarray:
        """Shape (n, d_in) float32 -> (n, d_out) float32, unit rows. `residual`: one row per row
        of `raw`, or, with `rows`, the residuals of those rows of `raw` only (the others none)."""
        raw = np.asarray(raw, np.float32)
        if self.weight is None:
            return normalise_rows(raw)
        out = raw @ self.weight
        if residual is not None and rows is None:
            out = out + residual
        elif residual is not None:
            out[rows] += residual
        return normalise_rows(out)

    def bias(self, raw: np.ndarray, item_bias: np.ndarray | None = None,
             rows: np.ndarray | None = None) -> np.ndarray:
        """Popularity bias predicted from text, shape (n,); `item_bias` and `rows` as in `transform`."""
        if self.bias_weight is None:
            return np.zeros(len(raw), np.float32)
        b = np.asarray(raw, np.float32) @ self.bias_weight + self.bias_const
        if item_bias is not None and rows is None:
            b = b + item_bias
        elif item_bias is not None:
            b[rows] += item_bias
        return b.astype(np.float32)

    def tensors(self) -> dict[str, np.ndarray]:
        if not self.trained:
            return {}
        return {"projection.weight": self.weight, "projection.bias_weight": self.bias_weight,
                "projection.scalars": np.array([self.bias_const], np.float32), "projection.taus": self.taus}

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], d_in: int) -> "Projection":
        if "projection.weight" not in t:
            return cls(d_in)
        return cls(d_in, t["projection.weight"], t["projection.bias_weight"],
                   float(t["projection.scalars"][0]), t["projection.taus"])

"""The item tower: raw text vector -> retrieval space. The identity until `fit` trains it."""

from __future__ import annotations

import numpy as np


def normalise_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


class Projection:
    """Maps text vectors (n, d_text) to unit retrieval vectors (n, d_out).

    Untrained it is the identity. A trained one is `normalise(e @ W + r_item)`: a linear map of the
    text vector (so a cold item lands where warm items with similar text live) plus, for warm
    items only, a learned residual (their audience), which the engine supplies per row.
    """

    def __init__(self, d_in: int, weight: np.ndarray | None = None) -> None:
        self.d_in = d_in
        self.weight = None if weight is None else np.ascontiguousarray(weight, np.float32)

    @property
    def trained(self) -> bool:
        return self.weight is not None

    @property
    def d_out(self) -> int:
        return self.d_in if self.weight is None else int(self.weight.shape[1])

    def transform(self, raw: np.ndarray, residual: np.ndarray | None = None) -> np.ndarray:
        """Shape (n, d_in) float32 -> (n, d_out) float32, unit rows."""
        if self.weight is None:
            return normalise_rows(np.asarray(raw, np.float32))
        out = np.asarray(raw, np.float32) @ self.weight
        if residual is not None:
            out = out + residual
        return normalise_rows(out)

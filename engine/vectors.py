"""Small array helpers every part shares: unit length, and arrays that grow by doubling."""

from __future__ import annotations

import numpy as np

from .errors import InvalidInputError

#: Norms below this count as zero: far under any real embedding's norm, far above float32 noise
#: around 0 that dividing by would blow up.
ZERO_NORM = 1e-12


def normalise(v: np.ndarray) -> np.ndarray:
    """One vector at unit length, float32; the zero vector stays zero (a user with no signal).

    Kept apart from `normalise_rows`: a 1-d norm and a row-wise one may round differently in the
    last bit, and every stored user vector was computed with this one.
    """
    n = float(np.linalg.norm(v))
    return (v / n).astype(np.float32) if n > ZERO_NORM else np.zeros_like(v, dtype=np.float32)


def normalise_rows(x: np.ndarray) -> np.ndarray:
    """Each row at unit length, float32; zero rows stay zero."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, ZERO_NORM)).astype(np.float32)


def grown(arr: np.ndarray, n: int, at_least: int = 0, fill: float = 0) -> np.ndarray:
    """`arr` if it has n rows, else a copy with room for max(n, 2 * rows, at_least) rows, the
    new ones `fill` (doubling keeps appends amortised O(1)); same dtype and trailing shape.

    With fill 0 the room comes from np.zeros: fresh zero pages the OS maps in only when a row
    is written, so the doubled capacity costs address space, not resident memory (a trained
    100k store's tower vectors: +51 MB resident on its first added item with np.full)."""
    if len(arr) >= n:
        return arr
    shape = (max(n, 2 * len(arr), at_least),) + arr.shape[1:]
    out = np.zeros(shape, arr.dtype) if fill == 0 else np.full(shape, fill, arr.dtype)
    out[: len(arr)] = arr
    return out


def slices(starts: np.ndarray, lens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The positions of consecutive slices [starts[i], starts[i] + lens[i]) of a flat array, in
    order, as CSR parts: (indptr, positions). One gather then reads every slice at once."""
    indptr = np.zeros(len(lens) + 1, np.int64)
    np.cumsum(lens, out=indptr[1:])
    return indptr, np.repeat(np.asarray(starts, np.int64) - indptr[:-1], lens) + np.arange(indptr[-1])


def sorted_unique(a: np.ndarray, return_inverse: bool = False):
    """`np.unique` of a 1-d integer array (sorted distinct values; with `return_inverse`, also
    the position of each element's value among them), by one sort.

    The same answer as np.unique, several times faster on the few hundred rows of a request
    (np.unique's hash pass and its checks cost ~30 us there; this ~6 us).
    """
    a = np.asarray(a)
    order = np.argsort(a, kind="stable") if return_inverse else None
    s = a[order] if return_inverse else np.sort(a)
    first = np.empty(len(s), bool)
    first[:1] = True
    np.not_equal(s[1:], s[:-1], out=first[1:])
    if not return_inverse:
        return s[first]
    inverse = np.empty(len(s), np.int64)
    inverse[order] = np.cumsum(first) - 1
    return s[first], inverse


def find_sorted(sorted_set: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each of `values` sits in `sorted_set` (sorted, 1-d, not empty): (positions, found),
    a position valid only where found is true. One binary search for every value."""
    pos = np.searchsorted(sorted_set, values)
    np.minimum(pos, len(sorted_set) - 1, out=pos)
    return pos, sorted_set[pos] == values


def outside(values: np.ndarray, sorted_set: np.ndarray) -> np.ndarray:
    """Bool mask: which of `values` are not in `sorted_set` (sorted, 1-d); `~np.isin` by one
    binary search, for the handful of rows a request excludes."""
    if not len(sorted_set):
        return np.ones(len(values), bool)
    return ~find_sorted(sorted_set, values)[1]


def check_vectors(x: np.ndarray, dim: int, what: str = "vectors") -> np.ndarray:
    """Return `x` as contiguous float32 (n, dim), or raise naming the rule it broke."""
    if not isinstance(x, np.ndarray):
        raise InvalidInputError(f"{what} must be a numpy array; got {type(x).__name__}")
    if x.dtype != np.float32:
        raise InvalidInputError(f"{what} must be float32 with shape (n, {dim}); got {x.dtype} {x.shape}")
    if x.ndim != 2 or x.shape[1] != dim:
        raise InvalidInputError(f"{what} must have shape (n, {dim}); got {x.shape}")
    if not np.isfinite(x).all():
        raise InvalidInputError(f"{what} must be finite; found NaN or inf")
    return np.ascontiguousarray(x)

"""The shared array helpers: unit length, and growth by doubling."""

from __future__ import annotations

import numpy as np

from engine.vectors import grown, normalise, normalise_rows


def test_normalise_rows_gives_unit_rows_and_keeps_zero_rows_zero(rng):
    x = rng.normal(size=(5, 7)).astype(np.float32)
    x[2] = 0.0
    out = normalise_rows(x)
    assert out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out[[0, 1, 3, 4]], axis=1), 1.0, atol=1e-6)
    assert not out[2].any()
    np.testing.assert_allclose(normalise(x[0]), out[0], atol=1e-7)


def test_grown_doubles_keeps_content_dtype_and_shape():
    a = np.arange(6, dtype=np.int64).reshape(3, 2)
    assert grown(a, 3) is a
    b = grown(a, 4)
    assert b.shape == (6, 2) and b.dtype == np.int64 and (b[:3] == a).all() and not b[3:].any()
    assert len(grown(a, 20)) == 20 and len(grown(np.zeros(0, bool), 1, at_least=1024)) == 1024


def test_slices_gather_consecutive_runs_in_order():
    from engine.vectors import slices

    indptr, pos = slices(np.array([5, 0, 9, 2]), np.array([2, 0, 3, 1]))
    assert indptr.tolist() == [0, 2, 2, 5, 6]
    assert pos.tolist() == [5, 6, 9, 10, 11, 2]
    indptr, pos = slices(np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert indptr.tolist() == [0] and pos.tolist() == []


def test_grown_fills_new_rows_with_the_fill_value():
    out = grown(np.array([3, 4]), 5, fill=-1)
    assert out[:2].tolist() == [3, 4] and (out[2:] == -1).all() and len(out) == 5


def test_sorted_unique_and_outside_equal_numpys_answers(rng):
    from engine.vectors import find_sorted, outside, sorted_unique

    for size, high in ((0, 5), (1, 5), (7, 3), (400, 100), (400, 100_000)):
        a = rng.integers(0, high, size).astype(np.int64)
        np.testing.assert_array_equal(sorted_unique(a), np.unique(a))
        uniq, inverse = sorted_unique(a, return_inverse=True)
        want, want_inverse = np.unique(a, return_inverse=True)
        np.testing.assert_array_equal(uniq, want)
        np.testing.assert_array_equal(inverse, want_inverse)
        for n_banned in (0, 1, 20):
            banned = rng.integers(0, high, n_banned).astype(np.int64)
            np.testing.assert_array_equal(outside(a, np.sort(banned)), ~np.isin(a, banned))
            if n_banned:
                pos, found = find_sorted(np.sort(banned), a)
                np.testing.assert_array_equal(found, np.isin(a, banned))
                np.testing.assert_array_equal(np.sort(banned)[pos[found]], a[found])

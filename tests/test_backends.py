"""One contract, every vector backend: FAISS (in process) and Milvus (a real Milvus Lite file).

Each case runs on both. Milvus Lite runs in this process; one .db file serves the module and each
test gets a fresh collection.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import InvalidInputError
from engine.serving.index import VectorIndex

pytest.importorskip("pymilvus")
from engine.serving.milvus import MilvusHome, MilvusIndex  # noqa: E402

DIM = 16
BACKENDS = ("faiss", "milvus")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    h = MilvusHome(str(tmp_path_factory.mktemp("milvus") / "contract.db"))
    yield h
    h.drop_all()
    h.close()


@pytest.fixture
def make(request, home):
    """make(kind) -> an empty index of the backend under test."""
    made = []

    def _make(kind: str = "flat", dim: int = DIM, backend: str | None = None):
        which = backend or request.param
        idx = VectorIndex(dim, kind) if which == "faiss" else MilvusIndex(home, dim, kind)
        made.append(idx)
        return idx

    yield _make
    for idx in made:
        if isinstance(idx, MilvusIndex) and idx.collection:
            home.client.drop_collection(idx.collection)


backends = pytest.mark.parametrize("make", BACKENDS, indirect=True)


def unit(n: int, seed: int = 0, dim: int = DIM) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def exact(x: np.ndarray, rows: np.ndarray, q: np.ndarray, k: int, ok=None) -> np.ndarray:
    s = x @ q
    keep = np.ones(len(rows), bool) if ok is None else ok
    order = np.argsort(-s[keep], kind="stable")[:k]
    return rows[keep][order]


@backends
def test_add_then_search_is_exact_on_flat(make):
    idx, x = make(), unit(50)
    rows = np.arange(50, dtype=np.int64) * 3  # rows need not be dense
    idx.build(rows, x)
    got, scores = idx.search(x[7], 5)
    assert got.tolist() == exact(x, rows, x[7], 5).tolist()
    assert got[0] == 21 and scores[0] == pytest.approx(1.0, abs=1e-5)
    assert np.all(np.diff(scores) <= 1e-6), "best first"
    assert idx.ntotal == idx.n_live == 50 and idx.contains(np.array([21, 22])).tolist() == [True, False]


@backends
def test_add_rows_later_and_refuse_held_rows(make):
    idx, x = make(), unit(20)
    idx.build(np.arange(10), x[:10])
    idx.add(np.arange(10, 20), x[10:])
    assert idx.search(x[15], 1)[0].tolist() == [15]
    with pytest.raises(InvalidInputError, match="already in the index"):
        idx.add(np.array([3]), x[:1])
    with pytest.raises(InvalidInputError, match="distinct non-negative"):
        idx.add(np.array([30, 30]), x[:2])
    assert idx.n_live == 20


@backends
def test_upsert_replaces_the_vector(make):
    idx, x = make(), unit(30)
    idx.build(np.arange(20), x[:20])
    idx.upsert(np.array([4, 25]), np.stack([x[28], x[25]]))  # row 4 moves to x[28]; row 25 is new
    assert idx.search(x[28], 1)[0].tolist() == [4]
    top = idx.search(x[4], 3)[0]
    assert 4 not in top.tolist(), "the old vector of row 4 is gone"
    assert idx.n_live == 21 and idx.contains(np.array([25])).all()


@backends
def test_removed_and_seen_rows_are_skipped_inside_the_search(make):
    idx, x = make(), unit(40)
    rows = np.arange(40)
    idx.build(rows, x)
    near = exact(x, rows, x[0], 10)
    idx.remove(near[:3])
    seen = near[3:6]
    got = idx.search(x[0], 5, exclude=seen)[0]
    assert len(got) == 5, "k rows come back when k qualify"
    assert not set(got) & set(near[:6].tolist())
    assert got.tolist() == near[6:10].tolist() + [exact(x, rows, x[0], 11)[10]]
    assert idx.contains(near[:3]).sum() == 0 and idx.n_live == 37
    idx.remove(np.array([999, near[0]]))  # unknown and already removed rows are ignored
    assert idx.n_live == 37


@backends
def test_filter_still_returns_k(make):
    idx, x = make(), unit(200, seed=1)
    rows = np.arange(200)
    idx.build(rows, x)
    allowed = np.zeros(150, bool)  # rows past the mask's end do not qualify
    allowed[[3, 50, 77, 120, 149]] = True
    got = idx.search(x[0], 5, allowed=allowed)[0]
    assert sorted(got.tolist()) == [3, 50, 77, 120, 149]
    got = idx.search(x[0], 5, exclude=np.array([50]), allowed=allowed)[0]
    assert sorted(got.tolist()) == [3, 77, 120, 149]
    wide = np.ones(200, bool)
    wide[exact(x, rows, x[0], 3)] = False  # the complement is the shorter list here
    assert idx.search(x[0], 4, allowed=wide)[0].tolist() == exact(x, rows, x[0], 4, wide).tolist()
    assert idx.search(x[0], 5, allowed=np.zeros(200, bool))[0].tolist() == []


@backends
def test_batch_search_equals_single_searches(make):
    idx, x = make(), unit(60, seed=2)
    idx.build(np.arange(60), x)
    q = unit(7, seed=3)
    ex, allowed = np.array([1, 2, 3]), np.arange(60) % 3 != 0
    batch = idx.search_batch(q, 6, exclude=ex, allowed=allowed)
    for i in range(len(q)):
        rows, scores = idx.search(q[i], 6, exclude=ex, allowed=allowed)
        assert batch[i][0].tolist() == rows.tolist()
        np.testing.assert_allclose(batch[i][1], scores, rtol=1e-5, atol=1e-6)


@backends
def test_empty_index_and_k_beyond_size(make):
    idx = make()
    idx.build(np.zeros(0, np.int64), np.zeros((0, DIM), np.float32))
    rows, scores = idx.search(unit(1)[0], 5)
    assert rows.dtype == np.int64 and scores.dtype == np.float32 and len(rows) == 0
    idx.add(np.array([0, 1]), unit(2))
    assert len(idx.search(unit(1)[0], 50)[0]) == 2


@backends
def test_dimension_and_dtype_mismatch_are_refused(make):
    idx = make()
    idx.build(np.arange(3), unit(3))
    with pytest.raises(InvalidInputError, match=rf"shape \(n, {DIM}\)"):
        idx.add(np.array([5]), unit(1, dim=DIM + 1))
    with pytest.raises(InvalidInputError, match="float32"):
        idx.add(np.array([5]), unit(1).astype(np.float64))
    with pytest.raises(InvalidInputError, match="query must be"):
        idx.search(np.zeros(DIM + 2, np.float32), 3)
    with pytest.raises(InvalidInputError, match="finite"):
        idx.upsert(np.array([1]), np.full((1, DIM), np.nan, np.float32))
    assert idx.n_live == 3


@backends
@pytest.mark.parametrize("kind", ["hnsw", "hnsw-sq8", "ivf"])
def test_approximate_kinds_find_most_neighbours(make, kind):
    idx, x = make(kind), unit(600, seed=4)
    rows = np.arange(600)
    idx.build(rows, x)
    q = unit(10, seed=5)
    hits = sum(len(set(idx.search(q[i], 10)[0].tolist()) & set(exact(x, rows, q[i], 10).tolist()))
               for i in range(len(q)))
    assert hits / 100 >= 0.8, f"recall@10 {hits / 100:.2f} on {kind}"
    assert idx.kind == kind


def test_faiss_upsert_on_hnsw_asks_for_a_rebuild(make):
    idx = make("hnsw", backend="faiss")
    idx.build(np.arange(5), unit(5))
    with pytest.raises(InvalidInputError, match="rebuild"):
        idx.upsert(np.array([1]), unit(1))


def test_milvus_lite_refuses_ivf_pq(home):
    with pytest.raises(InvalidInputError, match="Milvus Lite does not build IVF_PQ"):
        MilvusIndex(home, DIM, "ivf-pq")


def test_milvus_filter_expression_is_the_shorter_list(home):
    idx = MilvusIndex(home, DIM)
    idx._held = np.ones(10, bool)  # the bookkeeping alone decides the expression
    allowed = np.zeros(10, bool)
    allowed[[2, 5]] = True
    assert idx.filter_expression(None, allowed) == "id in [2,5]"
    assert idx.filter_expression(np.array([5]), allowed) == "id in [2]"
    assert idx.filter_expression(None, ~allowed) == "id not in [2,5]"
    assert idx.filter_expression(np.array([7, 3, 7]), None) == "id not in [3,7]"
    assert idx.filter_expression(None, np.ones(10, bool)) == ""
    assert idx.filter_expression(np.array([2, 5]), allowed) is None


@backends
def test_persistence_across_reopen(make, tmp_path, request):
    x = unit(30, seed=6)
    if request.node.callspec.params["make"] == "faiss":
        idx = make()
        idx.build(np.arange(30), x)
        idx.remove(np.array([2]))
        idx.save(tmp_path / "i.faiss")
        again = VectorIndex(DIM)
        again.load(tmp_path / "i.faiss", np.setdiff1d(np.arange(30), [2]), 30)
    else:  # its own file: closing the last client stops the in-process server, reopening restarts it
        uri = str(tmp_path / "own.db")
        h = MilvusHome(uri)
        idx = MilvusIndex(h, DIM)
        idx.build(np.arange(30), x)
        idx.remove(np.array([2]))
        name = idx.collection
        h.close()
        h2 = MilvusHome(uri, prefix=h.prefix)
        request.addfinalizer(h2.close)
        again = MilvusIndex(h2, DIM)
        assert again.attach(name, 30)
        assert not MilvusIndex(h2, DIM).attach("kindling_missing", 30)
    assert again.n_live == 29 and not again.contains(np.array([2])).any()
    assert again.search(x[2], 3)[0].tolist() == exact(x, np.arange(30), x[2], 4)[1:].tolist()

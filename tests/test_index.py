"""The FAISS wrapper: every index kind honours the same contract (add, remove, exclude, save/load)."""

from __future__ import annotations

import numpy as np
import pytest

from engine import Config, CorruptStoreError, Engine, InvalidInputError, Item
from engine.serving.index import VectorIndex
from engine.vectors import check_vectors

DIM = 16
N = 200
EXACT_KINDS = ("flat", "hnsw", "ivf")  # exact at this size (HNSW with ef 128, IVF probing every list)
ALL_KINDS = EXACT_KINDS + ("hnsw-sq8", "ivf-pq")


def unit_rows(rng: np.random.Generator, n: int = N, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(x: np.ndarray, q: np.ndarray, k: int, banned=()) -> list[int]:
    scores = x @ q
    order = [int(r) for r in np.argsort(-scores, kind="stable") if int(r) not in set(banned)]
    return order[:k]


def built(kind: str, x: np.ndarray) -> VectorIndex:
    idx = VectorIndex(DIM, kind)
    idx.build(np.arange(len(x)), x)
    return idx


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_add_and_search_basic_contract(kind, rng):
    x = unit_rows(rng)
    idx = built(kind, x)
    assert idx.ntotal == N and idx.n_live == N
    rows, scores = idx.search(x[7], 10)
    assert rows.dtype == np.int64 and scores.dtype == np.float32
    assert len(rows) == 10 and len(set(rows.tolist())) == 10
    assert np.all(np.diff(scores) <= 1e-5)  # best first
    assert (rows >= 0).all() and (rows < N).all()


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_search_matches_brute_force(kind, rng):
    x = unit_rows(rng)
    idx = built(kind, x)
    for q in (x[0], x[42], unit_rows(rng, 1)[0]):
        rows, scores = idx.search(q, 10)
        assert rows.tolist() == brute_force(x, q, 10)
        np.testing.assert_allclose(scores, (x @ q)[rows], atol=1e-5)


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_removed_rows_are_skipped_inside_the_search(kind, rng):
    x = unit_rows(rng)
    idx = built(kind, x)
    q = x[3]
    top = brute_force(x, q, 20)
    idx.remove(top[:10])  # the ten best are gone: a post-filter over 10 hits would return nothing
    rows, _ = idx.search(q, 10)
    assert len(rows) == 10
    assert rows.tolist() == top[10:20]
    assert idx.n_live == N - 10 and idx.ntotal == N
    assert not idx.contains(np.array(top[:10])).any() and idx.contains(np.array(top[10:])).all()


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_exclusions_are_applied_inside_the_search(kind, rng):
    x = unit_rows(rng)
    idx = built(kind, x)
    q = x[11]
    top = brute_force(x, q, 15)
    rows, _ = idx.search(q, 5, exclude=np.array(top[:10], np.int64))
    assert rows.tolist() == top[10:15]
    rows, _ = idx.search(q, 5)  # exclusions are per query, not remembered
    assert rows.tolist() == top[:5]


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_fewer_results_when_fewer_rows_qualify(kind, rng):
    x = unit_rows(rng, 30)
    idx = built(kind, x)
    idx.remove(np.arange(25))
    rows, scores = idx.search(x[0], 10)
    assert sorted(rows.tolist()) == [25, 26, 27, 28, 29] and len(scores) == 5
    idx.remove(np.arange(25, 30))
    rows, _ = idx.search(x[0], 10)
    assert len(rows) == 0


@pytest.mark.parametrize("kind", EXACT_KINDS)
def test_batch_add_and_single_adds_agree(kind, rng):
    x = unit_rows(rng, 60)
    whole = built(kind, x)
    one_by_one = VectorIndex(DIM, kind)
    for r in range(len(x)):
        one_by_one.add(np.array([r]), x[r:r + 1])
    for q in x[:5]:
        assert whole.search(q, 8)[0].tolist() == one_by_one.search(q, 8)[0].tolist()


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_search_batch_agrees_with_single_searches(kind, rng):
    x = unit_rows(rng)
    idx = built(kind, x)
    idx.remove(np.array([1, 2, 3]))
    queries = x[:6]
    exclude = np.array([10, 20, 30], np.int64)
    batch = idx.search_batch(queries, 7, exclude=exclude)
    assert len(batch) == len(queries)
    for q, (rows, scores) in zip(queries, batch):
        single_rows, single_scores = idx.search(q, 7, exclude=exclude)
        np.testing.assert_array_equal(rows, single_rows)
        np.testing.assert_allclose(scores, single_scores, atol=1e-6)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_save_load_round_trip(kind, rng, tmp_path):
    x = unit_rows(rng)
    idx = built(kind, x)
    idx.remove(np.array([0, 5, 9]))
    path = tmp_path / "index.faiss"
    idx.save(path)
    back = VectorIndex(DIM, "flat")  # the file decides the kind, not the caller's guess
    back.load(path, live_rows=np.setdiff1d(np.arange(N), [0, 5, 9]), n_rows=N)
    assert back.kind == kind
    assert back.ntotal == idx.ntotal and back.n_live == idx.n_live
    for q in x[:5]:
        a, sa = idx.search(q, 10)
        b, sb = back.search(q, 10)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(sa, sb, atol=1e-6)
        assert not set(b.tolist()) & {0, 5, 9}


def test_load_of_wrong_dimension_is_refused(rng, tmp_path):
    from engine import CorruptStoreError

    built("flat", unit_rows(rng)).save(tmp_path / "i.faiss")
    with pytest.raises(CorruptStoreError, match="dimension"):
        VectorIndex(DIM + 1, "flat").load(tmp_path / "i.faiss", np.arange(N), N)


def test_load_of_garbage_is_refused(tmp_path):
    from engine import CorruptStoreError

    (tmp_path / "i.faiss").write_bytes(b"not an index at all")
    with pytest.raises(CorruptStoreError, match="not a readable FAISS index"):
        VectorIndex(DIM, "flat").load(tmp_path / "i.faiss", np.arange(3), 3)


def test_a_held_row_cannot_be_added_twice(rng):
    x = unit_rows(rng, 10)
    idx = built("flat", x)
    idx.remove(np.array([4]))
    with pytest.raises(InvalidInputError, match="already in the index"):
        idx.add(np.array([4]), x[4:5])
    assert idx.holds(np.array([4]))[0] and not idx.contains(np.array([4]))[0]


@pytest.mark.parametrize("bad, rule", [
    (np.zeros((2, DIM), np.float64), "float32"),
    (np.zeros((2, DIM + 1), np.float32), r"shape \(n, 16\)"),
    (np.zeros(DIM, np.float32), r"shape \(n, 16\)"),
    (np.full((2, DIM), np.nan, np.float32), "finite"),
    (np.full((2, DIM), np.inf, np.float32), "finite"),
    ([[0.0] * DIM], "numpy array"),
])
def test_bad_vectors_rejected(bad, rule):
    idx = VectorIndex(DIM, "flat")
    with pytest.raises(InvalidInputError, match=rule):
        idx.add(np.arange(len(bad)), bad)
    assert idx.ntotal == 0


def test_bad_query_rejected(rng):
    idx = built("flat", unit_rows(rng, 10))
    with pytest.raises(InvalidInputError, match="float32"):
        idx.search(np.zeros(DIM, np.float64), 3)
    with pytest.raises(InvalidInputError, match="finite"):
        idx.search(np.full(DIM, np.nan, np.float32), 3)
    with pytest.raises(InvalidInputError, match="shape"):
        idx.search(np.zeros(DIM + 2, np.float32), 3)


def test_rows_and_vectors_must_pair_up(rng):
    idx = VectorIndex(DIM, "flat")
    with pytest.raises(InvalidInputError, match="one row each"):
        idx.add(np.arange(3), unit_rows(rng, 2))
    with pytest.raises(InvalidInputError, match="distinct"):
        idx.add(np.array([1, 1]), unit_rows(rng, 2))


def test_unknown_kind_rejected():
    with pytest.raises(ValueError, match="index kind must be one of"):
        VectorIndex(DIM, "annoy")


def test_check_vectors_returns_contiguous():
    x = np.zeros((4, 2 * DIM), np.float32)[:, ::2]
    assert not x.flags.c_contiguous
    assert check_vectors(x, DIM).flags.c_contiguous


# ---- through the engine: compaction, upsert, kind on reopen ------------------------------------

def test_compaction_after_enough_removals(engine, catalog):
    assert engine.stats()["index"]["vectors"] == 12
    engine.remove_items(["space-0", "space-1"])  # 2/12 below the 0.25 ratio: tombstones stay
    assert engine.stats()["index"] == {**engine.stats()["index"], "vectors": 12, "tombstones": 2}
    engine.remove_items(["space-2"])  # 3/12 = 0.25, not above
    engine.remove_items(["food-0"])  # 4/12 > 0.25: rebuilt from the live rows
    idx = engine.stats()["index"]
    assert idx["vectors"] == 8 and idx["tombstones"] == 0
    got = {r.item_id for r in engine.recommend("u", k=20, profile="orbit rocket space")}
    assert got == {i.item_id for i in catalog} - {"space-0", "space-1", "space-2", "food-0"}


def test_upsert_replaces_the_vector_once(engine):
    engine.add_items([Item("space-0", "Space 0", "pasta recipe tomato sauce", ("food",))], upsert=True)
    sims = [r.item_id for r in engine.similar_items("food-0", k=11)]
    assert len(sims) == len(set(sims)) == 11
    assert sims[0] == "space-0"
    assert engine.stats()["index"]["vectors"] == 12


def test_revived_item_is_listed_once(engine):
    engine.remove_items(["ball-0"])
    engine.add_items([Item("ball-0", "Ball 0", "football match goal league", ("ball",))])
    sims = [r.item_id for r in engine.similar_items("ball-1", k=11)]
    assert sims.count("ball-0") == 1 and len(sims) == 11


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_engine_with_each_index_kind(tmp_path, fake_encoder, catalog, kind):
    with Engine.create(tmp_path / "s", Config(index=kind), encoder=fake_encoder) as eng:
        eng.add_items(catalog)
        assert eng.stats()["index"]["kind"] == kind
        eng.remove_items(["food-1"])
        sims = [r.item_id for r in eng.similar_items("food-0", k=3)]
        assert "food-1" not in sims and set(sims) <= {"food-2", "food-3", "space-0", "space-1", "space-2",
                                                      "space-3", "ball-0", "ball-1", "ball-2", "ball-3"}
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as eng:
        assert eng.stats()["index"]["kind"] == kind
        assert [r.item_id for r in eng.similar_items("food-0", k=3)] == sims


def test_auto_kind_survives_reopen_after_compaction(tmp_path, fake_encoder, catalog):
    cfg = Config(index="auto", exact_threshold=10)
    with Engine.create(tmp_path / "s", cfg, encoder=fake_encoder) as eng:
        eng.add_items(catalog)
        assert eng.stats()["index"]["kind"] == "hnsw"
        eng.remove_items([i.item_id for i in catalog[:4]])  # compaction rebuilds: 8 live < 10 -> flat
        assert eng.stats()["index"]["kind"] == "flat"
        before = [r.item_id for r in eng.similar_items("food-0", k=5)]
    with Engine.open(tmp_path / "s", encoder=fake_encoder) as eng:
        assert eng.stats()["index"]["kind"] == "flat"
        assert [r.item_id for r in eng.similar_items("food-0", k=5)] == before


def test_every_configurable_index_kind_can_be_built():
    """One list of index kinds: config.INDEX_KINDS; FAISS builds each but 'auto'."""
    from engine.config import INDEX_KINDS
    from engine.serving.index import FACTORY

    assert set(FACTORY) == set(INDEX_KINDS) - {"auto"}


@pytest.mark.parametrize("kind", ["flat", "hnsw", "hnsw-sq8", "ivf"])
def test_stored_reads_faiss_own_floats_through_adds_upserts_and_a_reload(kind, rng, tmp_path):
    """`stored` gives, bit for bit, the vectors FAISS holds for rows (flat and hnsw keep floats),
    after appends, an upsert (flat: FAISS compacts its storage), and a save and load; None for
    kinds that keep codes, and for rows FAISS does not hold."""
    dim = DIM
    v = unit_rows(rng, 300)
    rows = np.arange(0, 600, 2)
    idx = VectorIndex(dim, kind)
    idx.build(rows, v)
    if kind not in ("flat", "hnsw"):
        assert idx.stored(rows[:3]) is None
        if kind == "hnsw-sq8":  # the vectors its codes stand for: close, not equal
            got = idx.decoded(rows[[5, 0, 5]])
            assert got.shape == (3, dim) and np.abs(got - v[[5, 0, 5]]).max() < 0.02
            assert idx.decoded(np.array([1])) is None and idx.decoded(rows[[7]], 4).shape == (1, 4)
        else:
            assert idx.decoded(rows[:3]) is None
        return
    assert idx.decoded(rows[:3]) is None
    np.testing.assert_array_equal(idx.stored(rows[[5, 0, 5]]), v[[5, 0, 5]])
    one = idx.stored(rows[[7]], 4)
    np.testing.assert_array_equal(one, v[[7], :4])
    one[:] = 9.0  # a copy: FAISS's storage is not written through it
    np.testing.assert_array_equal(idx.stored(rows[[7]]), v[[7]])
    assert idx.stored(np.array([1])) is None and idx.stored(np.array([10_000])) is None
    assert idx.stored(np.array([-1])) is None
    more = unit_rows(rng, 3)
    idx.add(np.array([1, 3, 9_999]), more)
    np.testing.assert_array_equal(idx.stored(np.array([9_999, 1, 598])), np.vstack([more[2], more[0], v[299]]))
    if kind == "flat":
        new = unit_rows(rng, 1)
        idx.upsert(np.array([0]), new)
        np.testing.assert_array_equal(idx.stored(np.array([0, 2, 3])), np.vstack([new[0], v[1], more[1]]))
    idx.save(tmp_path / "i.faiss")
    again = VectorIndex(dim, kind)
    again.load(tmp_path / "i.faiss", np.arange(600), 10_000)
    held = np.array([2, 598, 9_999])
    np.testing.assert_array_equal(again.stored(held), idx.stored(held))


def test_an_index_written_as_idmap2_by_earlier_versions_still_loads(rng, tmp_path):
    """Stores written before the switch to IndexIDMap hold an IndexIDMap2: same search, same
    stored vectors."""
    import faiss

    x = unit_rows(rng)
    old = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    old.add_with_ids(x, np.arange(N, dtype=np.int64) * 3)
    faiss.write_index(old, str(tmp_path / "old.faiss"))
    idx = VectorIndex(DIM, "flat")
    idx.load(tmp_path / "old.faiss", np.arange(N) * 3, 3 * N)
    assert idx.search(x[7], 1)[0].tolist() == [21]
    np.testing.assert_array_equal(idx.stored(np.array([21, 0])), x[[7, 0]])


def test_hnsw_sq8_pads_to_a_multiple_of_8_and_older_unpadded_files_still_load(rng, tmp_path):
    """FAISS's SQ8 distances take their SIMD path only at widths that are multiples of 8: the
    index appends zero columns (inner products unchanged). A 385-wide SQ8 file written before
    the padding loads and searches as it did."""
    import faiss

    dim = 13
    x = unit_rows(rng, 300, dim)
    idx = VectorIndex(dim, "hnsw-sq8")
    idx.build(np.arange(300), x)
    assert idx._faiss.d == 16
    exact = [int(np.argmax(x @ x[j])) for j in range(20)]
    assert sum(idx.search(x[j], 1)[0][0] == exact[j] for j in range(20)) >= 19
    idx.save(tmp_path / "padded.faiss")
    again = VectorIndex(dim, "hnsw")  # the file decides the kind
    again.load(tmp_path / "padded.faiss", np.arange(300), 300)
    assert again.kind == "hnsw-sq8" and again.search(x[3], 1)[0].tolist() == idx.search(x[3], 1)[0].tolist()
    old = faiss.IndexIDMap(faiss.index_factory(dim, "HNSW16_SQ8", faiss.METRIC_INNER_PRODUCT))
    old.train(x)
    old.add_with_ids(x, np.arange(300, dtype=np.int64))
    faiss.write_index(old, str(tmp_path / "old.faiss"))
    unpadded = VectorIndex(dim, "hnsw-sq8")
    unpadded.load(tmp_path / "old.faiss", np.arange(300), 300)
    assert unpadded.search(x[5], 1)[0].tolist() == [exact[5]]
    flat16 = faiss.IndexIDMap(faiss.IndexFlatIP(16))  # padding is for sq8 only
    faiss.write_index(flat16, str(tmp_path / "flat16.faiss"))
    with pytest.raises(CorruptStoreError, match="dimension 16, expected 13"):
        VectorIndex(dim, "flat").load(tmp_path / "flat16.faiss", np.arange(0), 0)

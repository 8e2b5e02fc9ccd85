"""`fit`'s faster paths compute what the straightforward ones did; a seed gives the same weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from engine import Config, Engine
from engine.training.fit import fit_threads
from engine.training import towers
from engine.training.towers import _examples

from conftest import FakeEncoder
from test_fit import catalog, clicks


def reference_examples(histories: list[np.ndarray], rng: np.random.Generator, max_hist: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """towers._examples as first written: one np.delete, choice and pad per click."""
    targets, hists, lens = [], [], []
    for h in histories:
        for j in range(len(h)):
            others = np.delete(h, j)
            m = int(rng.integers(0, min(len(others), max_hist) + 1))
            pick = rng.choice(others, size=m, replace=False) if m else others[:0]
            targets.append(h[j])
            hists.append(np.pad(pick, (0, max_hist - m), constant_values=-1))
            lens.append(m)
    order = rng.permutation(len(targets))
    return (np.asarray(targets, np.int64)[order], np.asarray(hists, np.int64).reshape(-1, max_hist)[order],
            np.asarray(lens, np.int64)[order])


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("max_hist", [1, 3, 30])
def test_tower_examples_match_the_reference_draw_for_draw(seed: int, max_hist: int) -> None:
    rng = np.random.default_rng(seed)
    # lengths on both sides of max_hist, where the number drawn stops growing with the history
    histories = [rng.choice(20_000, size=int(n), replace=False).astype(np.int64)
                 for n in [2, 3, max_hist, max_hist + 1, max_hist + 2, *rng.integers(2, 60, 20)]]
    got = _examples(histories, np.random.default_rng(seed + 10), max_hist)
    want = reference_examples(histories, np.random.default_rng(seed + 10), max_hist)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_array_equal(g, w)


def test_fit_threads_are_set_inside_and_given_back() -> None:
    before = torch.get_num_threads()
    assert Config().fit_threads == 1
    with fit_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with fit_threads(0):  # 0: as they are
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="fit_threads must be >= 0"):
        Config(fit_threads=-1)


def _blas_threads() -> set[int]:
    """Thread counts of the BLAS libraries that do not thread through OpenMP (numpy's)."""
    from threadpoolctl import threadpool_info

    from engine.threads import OPENMP_LAYERS

    return {lib["num_threads"] for lib in threadpool_info()
            if lib["user_api"] == "blas" and lib.get("threading_layer") not in OPENMP_LAYERS}


def test_an_engine_sets_blas_threads_process_wide_and_leaves_faiss_its_cores(tmp_path: Path) -> None:
    """Config.blas_threads (default 1) is what numpy's BLAS runs on once an engine is made;
    0 leaves the count as the process had it. FAISS's OpenMP threads (its index builds) are
    never touched, by the engine nor by fit: faiss-cpu's own BLAS threads through OpenMP, and
    limiting it with the rest once left FAISS's builds on one core."""
    import faiss
    from engine.threads import numpy_blas

    if not _blas_threads():
        pytest.skip("numpy is linked to no BLAS that threadpoolctl can see")
    omp = faiss.omp_get_max_threads()
    original = numpy_blas().limit(limits=2)  # a count the engine must change
    try:
        assert _blas_threads() == {2}
        Engine.create(tmp_path / "a", Config(fsync=False), encoder=FakeEncoder(dim=8)).close()
        assert _blas_threads() == {1} and faiss.omp_get_max_threads() == omp
        numpy_blas().limit(limits=2)
        Engine.create(tmp_path / "b", Config(fsync=False, blas_threads=0), encoder=FakeEncoder(dim=8)).close()
        assert _blas_threads() == {2}
        Engine.open(tmp_path / "a", encoder=FakeEncoder(dim=8)).close()  # the stored config: 1
        assert _blas_threads() == {1}
        with fit_threads(1):
            assert faiss.omp_get_max_threads() == omp
    finally:
        original.restore_original_limits()
    with pytest.raises(ValueError, match="blas_threads must be >= 0"):
        Config(blas_threads=-1)


def _fitted(path: Path) -> tuple[dict[str, np.ndarray], dict[str, list[str]], int]:
    cfg = Config(proj_epochs=1, proj_dim=16, rerank_epochs=2, fsync=False, seed=7)
    events = clicks(users=120, per_user=5)  # 120 users: enough for a reranker holdout
    eng = Engine.create(path, cfg, encoder=FakeEncoder(dim=32))
    eng.add_items(catalog())
    eng.import_events(events)
    threads = torch.get_num_threads()
    summary = eng.fit(events, progress=False)
    assert summary["projection"] and summary["reranker"]
    assert torch.get_num_threads() == threads  # fit gave the caller's thread count back
    st = eng._core.state  # noqa: SLF001 - the trained weights themselves
    weights = {k: np.array(v) for k, v in st.ranker.model_tensors(st.proj).items()}
    lists = {f"u{u}": [r.item_id for r in eng.recommend(f"u{u}", k=8)] for u in range(0, 120, 7)}
    eng.close(save=False)
    return weights, lists, len(weights)


def test_the_same_seed_fits_the_same_weights_bit_for_bit(tmp_path: Path) -> None:
    w1, lists1, n = _fitted(tmp_path / "a")
    w2, lists2, _ = _fitted(tmp_path / "b")
    assert n > 5 and sorted(w1) == sorted(w2)
    # the catalog's extent at the fit holds the wall-clock add time of the newest item: no weight
    assert w1["rerank.catalog"][0] == w2["rerank.catalog"][0]
    for name in w1:
        if name != "rerank.catalog":
            np.testing.assert_array_equal(w1[name], w2[name], err_msg=name)
    assert lists1 == lists2


class _ReferenceTower(towers.ItemTower):
    """ItemTower.forward as first written: every table gathered by `rows`."""

    def forward(self, rows, keep, dropout=0.0):
        e = self.text[rows]
        r, c = self.residual[rows], self.item_bias[rows]
        if keep is not None:
            r, c = r * keep[:, None], c * keep
        v = torch.nn.functional.normalize(e @ self.weight + r, dim=1)
        return v, e @ self.bias_weight + self.bias_const + c


def _reference_step(model, opt, target, hist, lens, live, warm, keep_p, max_softmax) -> float:
    """towers._step as first written: a dense exclusion mask, masked_fill, gathers by position."""
    nn = torch.nn
    mask = hist >= 0
    flat = hist.clamp(min=0).reshape(-1)
    if len(live) > max_softmax:
        neg = live[torch.randint(len(live), (max_softmax,))]
        pool = torch.unique(torch.cat([neg, target]))
    else:
        pool = live
    rows = torch.unique(torch.cat([pool, flat]))
    keep = (torch.rand(len(rows)) < keep_p).float() * warm[rows]
    v_rows, b_rows = model(rows, keep)
    at_pool = towers._positions(rows, pool)
    v_pool, b_pool = v_rows[at_pool], b_rows[at_pool]
    hv = v_rows[towers._positions(rows, flat)].reshape(*hist.shape, -1) * mask[..., None]
    u = nn.functional.normalize(hv.sum(1), dim=1)
    tau = model.log_tau.exp()[towers.tau_bucket(lens)]
    logits = tau[:, None] * (u @ v_pool.T) + b_pool
    pos = towers._positions(pool, target)
    hpos = towers._positions(pool, flat).reshape(hist.shape)
    mask = mask & (pool[hpos] == hist)
    excl = torch.zeros(logits.shape, dtype=torch.bool)
    excl.scatter_(1, torch.where(mask, hpos, pos[:, None].expand_as(hpos)), True)
    excl[torch.arange(len(pos)), pos] = False
    logits = logits.masked_fill(excl, -1e9)
    loss = nn.functional.cross_entropy(logits, pos)
    reg = towers.RESIDUAL_L2 * (model.residual.pow(2).sum(1).mean() + model.item_bias.pow(2).mean())
    opt.zero_grad()
    (loss + reg).backward()
    opt.step()
    return float(loss.detach())


def _train_steps(tower_cls, step, text: np.ndarray, live: np.ndarray, max_softmax: int, seed: int):
    rng = np.random.default_rng(seed)
    histories = [rng.choice(live, size=int(rng.integers(2, 25)), replace=False) for _ in range(40)]
    warm = np.zeros(len(text), bool)
    for h in histories:
        warm[h] = True
    with torch.random.fork_rng(devices=[]), fit_threads(1):
        torch.manual_seed(seed)
        model = tower_cls(torch.from_numpy(text), 16, towers.pca_init(text, 16, seed))
        opt = torch.optim.AdamW(model.parameters(), lr=towers.TOWER_LR)
        t, h, n = _examples(histories, rng, 8)
        losses = [step(model, opt, torch.from_numpy(t[s:s + 64]), torch.from_numpy(h[s:s + 64]),
                       torch.from_numpy(n[s:s + 64]), torch.from_numpy(live),
                       torch.from_numpy(warm.astype(np.float32)), 0.5, max_softmax)
                  for s in range(0, len(t), 64)]
    return losses, {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("removed", [False, True])
@pytest.mark.parametrize("max_softmax", [10_000, 50])
def test_tower_step_matches_the_reference_bit_for_bit(removed: bool, max_softmax: int) -> None:
    """Every row live and the whole catalog in the softmax (the identity shortcuts), some rows
    removed, and a sampled softmax pool: the same losses and weights, bit for bit."""
    rng = np.random.default_rng(3)
    text = rng.standard_normal((300, 24)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    live = np.flatnonzero(rng.random(300) > 0.2) if removed else np.arange(300)

    def new_step(model, opt, target, hist, lens, live_t, warm, keep_p, max_sm):
        return towers._step(model, opt, target, hist, lens, live_t, warm, keep_p, max_sm)

    got = _train_steps(towers.ItemTower, new_step, text, live, max_softmax, seed=5)
    want = _train_steps(_ReferenceTower, _reference_step, text, live, max_softmax, seed=5)
    assert len(got[0]) > 3 and got[0] == want[0]
    for name, w in want[1].items():
        np.testing.assert_array_equal(got[1][name], w, err_msg=name)

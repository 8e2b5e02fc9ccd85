"""`Engine.fit` on the bundled ratings, as `kindling demo` runs it, with a stage breakdown.

    python benchmarks/fit.py [--runs 1] [--dump DIR] [--profile] [--fit-threads N] [--out FILE]
    python benchmarks/fit.py --compare DIR_A DIR_B

The store is built once (bundled movielens-small items with the real MiniLM vectors from
benchmarks/.cache/, then `import_events` of the ratings >= 4, as engine/demo.py does) and kept in
$TMPDIR/kindling-bench/fit-base; each run fits a fresh copy of it with `Engine.fit(events)` under the
default Config. Wall seconds (time.perf_counter) and CPU seconds of this process (all threads,
time.process_time) are reported for the whole fit and for each stage (wrappers around the stage
functions, installed by this script only). `--dump DIR` writes the trained weights and the top-10
of 300 users to DIR/fit.npz, so two versions of the code can be compared (see --compare A B).
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import CATALOG, DIM, catalog_items, catalog_vectors  # noqa: E402

from engine import Engine  # noqa: E402
from engine.text.catalog import item_text, read_events  # noqa: E402

BASE = Path(tempfile.gettempdir()) / "kindling-bench" / "fit-base"


class TextLookup:
    """The real MiniLM vectors of the catalog's texts (cached), looked up by text."""

    name = "all-MiniLM-L6-v2"
    dim = DIM

    def __init__(self) -> None:
        vecs = catalog_vectors()
        self._rows = {item_text(it): i for i, it in enumerate(catalog_items())}
        self._vecs = vecs

    def encode(self, texts) -> np.ndarray:
        return self._vecs[np.array([self._rows[t] for t in texts], np.int64)].reshape(-1, DIM)


def base_store(enc: TextLookup) -> Path:
    if (BASE / "manifest.json").exists():
        return BASE
    shutil.rmtree(BASE, ignore_errors=True)
    BASE.parent.mkdir(parents=True, exist_ok=True)
    eng = Engine.create(BASE, encoder=enc)
    eng.ingest(catalog_items(), progress=False)
    eng.import_events(read_events(CATALOG, min_value=4.0))
    eng.close()
    return BASE


class Stages:
    """Wall and CPU seconds per named stage (nested stages count in their parents too).

    The wrappers are installed once per process and add to `Stages.current`."""

    current: "Stages | None" = None

    def __init__(self) -> None:
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    @staticmethod
    def wrap(owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **kw):
            w, c = time.perf_counter(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                st = Stages.current
                if st is not None:
                    st.wall[name] += time.perf_counter() - w
                    st.cpu[name] += time.process_time() - c
                    st.calls[name] += 1

        setattr(owner, attr, timed)

    def table(self) -> dict[str, dict[str, float]]:
        return {k: {"wall_s": round(self.wall[k], 2), "cpu_s": round(self.cpu[k], 2), "calls": self.calls[k]}
                for k in self.wall}


_INSTALLED = []


def install(stages: Stages) -> None:
    Stages.current = stages
    if _INSTALLED:
        return
    _INSTALLED.append(True)
    from engine.runtime.state import State
    from engine.training import fit as fitmod
    from engine.training import towers, reranker
    from engine.serving.ranking import Ranker
    from engine.runtime.core import Core

    stages.wrap(fitmod, "training_users", "training_users")
    stages.wrap(fitmod, "fit_towers", "towers (total)")
    stages.wrap(towers, "_examples", "towers: examples")
    stages.wrap(towers, "_step", "towers: steps")
    stages.wrap(fitmod, "reranker_lists", "reranker: lists (per fold and all)")
    stages.wrap(fitmod, "_example", "reranker: lists: one list")
    stages.wrap(fitmod, "fit_reranker", "reranker: training (total)")
    stages.wrap(reranker, "listwise_loss", "reranker: training: loss fwd")
    stages.wrap(reranker, "model_recalls", "reranker: training: validation")
    stages.wrap(reranker, "small_buckets", "reranker: per-bucket cross-validation")
    stages.wrap(Ranker, "refresh", "refresh item vectors")
    stages.wrap(State, "rebuild_coclicks", "rebuild_coclicks")
    stages.wrap(State, "rebuild_index", "rebuild_index")
    stages.wrap(State, "rederive", "rederive users")
    stages.wrap(Core, "commit", "snapshot (commit)")


def weights_of(eng: Engine) -> dict[str, np.ndarray]:
    st = eng._core.state  # noqa: SLF001 - a benchmark reads the trained state
    out = {f"w.{k}": np.asarray(v) for k, v in st.ranker.model_tensors(st.proj).items()}
    return out


def top10(eng: Engine, n_users: int = 300) -> np.ndarray:
    users = sorted(eng._core.state.users.vocab.ids())[:n_users]  # noqa: SLF001
    rows = []
    for u in users:
        recs = eng.recommend(u, k=10)
        rows.append([r.item_id for r in recs] + [""] * (10 - len(recs)))
    return np.array(rows)


def run_once(enc: TextLookup, profile: bool, dump: Path | None, fit_threads: int | None = None) -> dict:
    import faiss
    import torch

    base = base_store(enc)
    work = Path(tempfile.mkdtemp(prefix="kindling-fit-"))
    store = work / "store"
    shutil.copytree(base, store)
    try:
        events = read_events(CATALOG, min_value=4.0)
        eng = Engine.open(store, encoder=enc)
        if fit_threads is not None:  # Config.fit_threads for this run only (not saved in the base)
            st = eng._core.state  # noqa: SLF001
            st.config = st.config.replace(fit_threads=fit_threads)
        stages = Stages()
        install(stages)
        prof = cProfile.Profile() if profile else None
        threads = {"torch": torch.get_num_threads(), "faiss_omp": faiss.omp_get_max_threads(),
                   "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
        load0 = os.getloadavg()
        w, c = time.perf_counter(), time.process_time()
        if prof:
            prof.enable()
        summary = eng.fit(events, progress=False)
        if prof:
            prof.disable()
        wall, cpu = time.perf_counter() - w, time.process_time() - c
        out = {"fit_wall_s": round(wall, 2), "fit_cpu_s": round(cpu, 2), "threads": threads,
               "threads_after": {"torch": torch.get_num_threads(), "faiss_omp": faiss.omp_get_max_threads()},
               "loadavg_before": load0, "loadavg_after": os.getloadavg(), "events": len(events),
               "summary": summary, "stages": stages.table()}
        if prof:
            stats = pstats.Stats(prof, stream=sys.stderr)
            stats.sort_stats("cumulative").print_stats(40)
            stats.sort_stats("tottime").print_stats(25)
        if dump:
            dump.mkdir(parents=True, exist_ok=True)
            recs = top10(eng)
            np.savez(dump / "fit.npz", top10=recs, **weights_of(eng))
            sc = [[r.score for r in eng.recommend(u, k=10)]
                  for u in sorted(eng._core.state.users.vocab.ids())[:300]]  # noqa: SLF001
            np.save(dump / "scores.npy", np.array([s + [np.nan] * (10 - len(s)) for s in sc], np.float64))
        eng.close()
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def compare(a: Path, b: Path) -> dict:
    """Max absolute differences of the weights and scores of two dumps, and top-10 agreement."""
    x, y = np.load(a / "fit.npz"), np.load(b / "fit.npz")
    keys = [k for k in x.files if k != "top10"]
    diffs = {k: float(np.max(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)))) if x[k].size else 0.0
             for k in keys if x[k].shape == y[k].shape}
    sa, sb = np.load(a / "scores.npy"), np.load(b / "scores.npy")
    same = (x["top10"] == y["top10"]).all(axis=1)
    return {"max_weight_diff": max(diffs.values()), "weight_diffs": {k: v for k, v in diffs.items() if v},
            "shapes_differ": [k for k in keys if x[k].shape != y[k].shape],
            "top10_identical_users": int(same.sum()), "users": len(x["top10"]),
            "top10_overlap": float(np.mean([len(set(p) & set(q)) / 10 for p, q in zip(x["top10"], y["top10"])])),
            "max_score_diff": float(np.nanmax(np.abs(sa - sb)))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--dump", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path)
    ap.add_argument("--fit-threads", type=int, help="Config.fit_threads for the fit (default: the store's)")
    args = ap.parse_args()
    if args.compare:
        print(json.dumps(compare(*args.compare), indent=1))
        return
    enc = TextLookup()
    results = [run_once(enc, args.profile, args.dump, args.fit_threads) for _ in range(args.runs)]
    text = json.dumps({"cores": os.cpu_count(), "runs": results}, indent=1, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()

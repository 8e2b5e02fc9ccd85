"""The FAISS HNSW build at scale: build time, threads, recall@10 and search latency per (kind, M, efConstruction).

    python benchmarks/build.py [--n 1000000] [--grid 32:100 32:40 24:40 16:40] [--kinds hnsw hnsw-sq8]
                               [--ef-search 64 128 256] [--chunk 0] [--build-threads 0] [--pad-to 0] [--out FILE]

N clustered synthetic unit vectors (bench_data.synthetic of the catalog's MiniLM vectors, seed 0)
are indexed as the untrained engine indexes them, [v, 0] (385 wide, inner product), by a
`VectorIndex(385, kind, hnsw_m=M, ef_construction=efC).build(rows, vectors)`: the call
`ApplyState.rebuild_index` makes. 1,000 queries (seed 1) are the normalised mean of 5 items of one
cluster with the engine's query column, [u, 1] (Ranker.query); their exact top 10 (IndexFlatIP,
all cores) is the ground truth, computed once.

Per configuration, one at a time in this process: the build's wall clock and CPU time (user+sys of
the process, all threads: CPU / wall near 2 means both cores worked), the OpenMP threads FAISS has
before the build and the process's threads after it, the load average before and after, the RSS
growth over the build (after gc and malloc_trim) and the saved file's size per item; then, per
efSearch, recall@10 against the exact answer and the latency of `VectorIndex.search(q, 10)` one
query at a time with `search_threads=1` (as the engine searches). `--chunk C` adds the rows in
chunks of C (build of the first chunk, then `add`: what `add_items` batches do) instead of the
one call; `--build-threads T` sets FAISS's OpenMP threads for the build (0: FAISS's default);
`--pad-to D` (an experiment: the engine does not do it) appends zero columns up to width D.

Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import faiss
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_data as data  # noqa: E402
import bench_timing as bt  # noqa: E402

from engine.serving.index import VectorIndex  # noqa: E402

K = 10
PER_QUERY = 5  # items of one cluster averaged into a query


def make_data(n: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(index vectors [v, 0] (n, 385), queries [u, 1] (queries, 385)), float32."""
    vecs, cluster = data.synthetic(data.catalog_vectors(), n, seed=0)
    index_vecs = np.zeros((n, data.DIM + 1), np.float32)
    index_vecs[:, :-1] = vecs
    del vecs
    rng = np.random.default_rng(1)
    order = np.argsort(cluster, kind="stable")
    starts = np.searchsorted(cluster[order], np.arange(cluster.max() + 2))
    sizes = np.diff(starts)
    big = np.flatnonzero(sizes >= PER_QUERY)
    q = np.zeros((queries, data.DIM + 1), np.float32)
    for i, c in enumerate(rng.choice(big, queries, replace=True)):
        members = order[starts[c]:starts[c + 1]]
        u = index_vecs[rng.choice(members, PER_QUERY, replace=False), :-1].mean(axis=0)
        q[i, :-1] = u / np.linalg.norm(u)
    q[:, -1] = 1.0
    return index_vecs, q


def exact_top(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, float]:
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    t = time.perf_counter()
    _, rows = flat.search(queries, K)
    return rows, time.perf_counter() - t


class CpuSampler:
    """Samples, every `every` s, how many of the process's threads were busy and how many cores it used."""

    def __init__(self, every: float = 0.5) -> None:
        self.every, self.samples, self._stop = every, [], threading.Event()
        self.hz = os.sysconf("SC_CLK_TCK")
        self._t = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _ticks() -> dict[str, int]:
        out = {}
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                out[tid] = int(parts[11]) + int(parts[12])  # utime + stime
            except OSError:
                pass
        return out

    def _run(self) -> None:
        last = self._ticks()
        while not self._stop.wait(self.every):
            now = self._ticks()
            ticks = [now[t] - last.get(t, 0) for t in now]
            # a thread counts as busy when it used at least a fifth of a core over the interval
            busy = [d for d in ticks if d >= 0.2 * self.hz * self.every]
            self.samples.append((len(busy), sum(d for d in ticks if d > 0)))
            last = now

    def __enter__(self) -> CpuSampler:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()

    def summary(self) -> dict[str, Any]:
        if not self.samples:
            return {}
        busy = np.array([s[0] for s in self.samples])
        cores = np.array([s[1] for s in self.samples]) / self.hz / self.every
        return {"samples": len(busy), "threads_busy_median": float(np.median(busy)),
                "threads_busy_max": int(busy.max()), "share_samples_2plus_threads": round(float((busy >= 2).mean()), 3),
                "cores_used_median": round(float(np.median(cores)), 2)}


def run_one(kind: str, m: int, efc: int, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray,
            ef_searches: list[int], chunk: int, build_threads: int, tmp: Path) -> dict[str, Any]:
    n = len(vectors)
    rows = np.arange(n, dtype=np.int64)
    default_threads = faiss.omp_get_max_threads()
    if build_threads:
        faiss.omp_set_num_threads(build_threads)
    entry: dict[str, Any] = {"kind": kind, "M": m, "efConstruction": efc, "chunk": chunk or n,
                             "omp_threads_at_build": faiss.omp_get_max_threads(), "load_before": bt.load()}
    rss0 = bt.rss_bytes()
    vi = VectorIndex(vectors.shape[1], kind, hnsw_m=m, ef_construction=efc, search_threads=1)
    if kind == "ivf":  # M:efC mean nothing here; nlist is the engine's 4 * sqrt(n)
        entry.update({"M": None, "efConstruction": None})
    c0, t0 = os.times(), time.perf_counter()
    with CpuSampler() as sampler:
        if chunk and chunk < n:
            vi.build(rows[:chunk], vectors[:chunk])
            for s in range(chunk, n, chunk):
                vi.add(rows[s:s + chunk], vectors[s:s + chunk])
        else:
            vi.build(rows, vectors)
    wall, c1 = time.perf_counter() - t0, os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system)
    entry.update({"build_s": round(wall, 2), "build_cpu_s": round(cpu, 2), "cpu_per_wall": round(cpu / wall, 2),
                  "sampler": sampler.summary(), "load_after": bt.load(),
                  "process_threads_after": len(os.listdir("/proc/self/task"))})
    faiss.omp_set_num_threads(default_threads)
    entry["omp_threads_after_build"] = faiss.omp_get_max_threads()
    entry["rss_growth_bytes_per_item"] = round((bt.rss_bytes() - rss0) / n, 1)
    path = tmp / f"{kind}-{m}-{efc}.faiss"
    vi.save(path)
    entry["file_bytes_per_item"] = round(path.stat().st_size / n, 1)
    path.unlink()
    entry["search"] = {}
    for ef in ef_searches:  # efSearch for HNSW, nprobe for IVF
        vi.ef_search = vi.nprobe = ef
        found = np.full((len(queries), K), -1, np.int64)
        for i in range(min(20, len(queries))):  # warm-up
            vi.search(queries[i], K)
        times = []
        for i, q in enumerate(queries):
            t = time.perf_counter()
            r, _ = vi.search(q, K)
            times.append(time.perf_counter() - t)
            found[i, :len(r)] = r
        hits = sum(len(np.intersect1d(f[f >= 0], e)) for f, e in zip(found, truth))
        entry["search"][str(ef)] = {"recall_at_10": round(hits / truth.size, 4), **bt.summary(times)}
    entry["omp_threads_after_search"] = faiss.omp_get_max_threads()
    del vi
    bt.rss_bytes()
    return entry


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--grid", nargs="+", default=["32:100", "32:40", "24:40", "16:40"],
                   help="M:efConstruction pairs")
    p.add_argument("--kinds", nargs="+", default=["hnsw"], choices=["hnsw", "hnsw-sq8", "ivf"],
                   help="ivf: one build per run (the grid is ignored), --ef-search is then nprobe")
    p.add_argument("--ef-search", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--chunk", type=int, default=0, help="add in chunks of this many rows (0: one build call)")
    p.add_argument("--build-threads", type=int, default=0, help="FAISS OpenMP threads for the build (0: default)")
    p.add_argument("--pad-to", type=int, default=0,
                   help="experiment, not what the engine does: zero columns up to this width (e.g. 392, a "
                        "multiple of 8, which FAISS's SIMD SQ8 code needs)")
    p.add_argument("--out", type=Path)
    a = p.parse_args()
    grid = [tuple(int(x) for x in g.split(":")) for g in a.grid]
    result: dict[str, Any] = {"n": a.n, "queries": a.queries, "k": K, "machine": bt.machine(),
                              "note": "2-core host shared with the lead and other helpers: load in each entry",
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S"), "load_start": bt.load(),
                              "faiss_omp_max_threads": faiss.omp_get_max_threads(),
                              "omp_env": {k: v for k, v in os.environ.items() if k.startswith("OMP")}}
    t = time.perf_counter()
    vectors, queries = make_data(a.n, a.queries)
    if a.pad_to > vectors.shape[1]:
        pad = a.pad_to - vectors.shape[1]
        vectors, queries = (np.ascontiguousarray(np.pad(x, ((0, 0), (0, pad)))) for x in (vectors, queries))
    result["dim"] = vectors.shape[1]
    result["data_s"] = round(time.perf_counter() - t, 1)
    truth, exact_s = exact_top(vectors, queries)
    result["exact_search_s"] = round(exact_s, 2)
    result["runs"] = []
    with tempfile.TemporaryDirectory(prefix="kindling-build-") as tmp:
        for kind in a.kinds:
            for m, efc in (grid if kind != "ivf" else grid[:1]):
                entry = run_one(kind, m, efc, vectors, queries, truth, a.ef_search, a.chunk,
                                a.build_threads, Path(tmp))
                result["runs"].append(entry)
                print(kind, m, efc, "build", entry["build_s"], "s cpu/wall", entry["cpu_per_wall"],
                      {ef: (s["recall_at_10"], s["p50_ms"], s["p99_ms"]) for ef, s in entry["search"].items()},
                      "load", entry["load_before"], entry["load_after"], file=sys.stderr, flush=True)
                if a.out:  # an interrupted run keeps what it measured
                    a.out.write_text(json.dumps(result, indent=2) + "\n")
    bt.finish(result, a.out)


if __name__ == "__main__":
    main()

"""FAISS against Milvus (Lite, or a server with --milvus-uri), side by side in one run: build time, memory, p50/p99 search, recall@10.

    python benchmarks/backends.py                       # 100k items (about 10 minutes here)
    python benchmarks/backends.py --sizes 100000 1000000 --milvus-queries 10
    python benchmarks/backends.py --sizes 20000 --queries 50 --out results/backends-smoke.json
    python benchmarks/backends.py --sizes 20000 --milvus-uri http://127.0.0.1:19530 --milvus-batch 20

Both backends are driven through the engine's index classes (`VectorIndex`, `MilvusIndex`), the
calls `recommend` makes: a top-10 search with the user's 3 seen rows excluded inside the search
("plain"), and the same under a filter that lets 10% of the rows through ("filtered": an
IDSelector for FAISS, an `id in [...]` expression for Milvus). Vectors: the clustered synthetic
catalog of bench_data.py (real MiniLM vectors plus noise, 384 dimensions, unit length); queries
are other items of the same distribution. Recall@10 is against exact numpy search with the same
exclusions. Build: `build()` (for Milvus: insert, flush, and the wait until Milvus reports every
row indexed). Memory: the process's RSS growth over the build (Milvus Lite runs in this
process) and the bytes on disk (the FAISS file; the Milvus Lite directory).
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import catalog_vectors, synthetic  # noqa: E402
from bench_timing import load, machine, rss_bytes, summary  # noqa: E402

from engine.serving.index import VectorIndex  # noqa: E402

K = 10
SEEN = 3
WARMUP = 3
RESULTS = Path(__file__).resolve().parent / "results"


def exact_top(x: np.ndarray, q: np.ndarray, banned: np.ndarray, ok: np.ndarray | None) -> np.ndarray:
    s = x @ q
    s[banned] = -np.inf
    if ok is not None:
        s[~ok] = -np.inf
    top = np.argpartition(-s, K)[:K]
    return top[np.argsort(-s[top])]


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def wait_indexed(idx, timeout: float = 600) -> None:
    """Until Milvus says every row is indexed (Milvus Lite builds segment indexes in the background)."""
    end = time.time() + timeout
    while time.time() < end:
        info = idx.client.describe_index(idx.collection, "vec")
        if int(info.get("pending_index_rows", 0)) == 0 and int(info.get("indexed_rows", 0)) >= idx.n_live:
            return
        time.sleep(1)


def measure(idx, x: np.ndarray, queries: np.ndarray, seen: list[np.ndarray], ok: np.ndarray,
            n_plain: int, n_filtered: int, truth: dict) -> dict:
    out = {}
    for mode, n, allowed in (("plain", n_plain, None), ("filtered", n_filtered, ok)):
        times, hits, got_k = [], 0, 0
        for i in range(min(n + WARMUP, len(queries))):
            t = time.perf_counter()
            rows, _ = idx.search(queries[i], K, exclude=seen[i], allowed=allowed)
            dt = time.perf_counter() - t
            if i < WARMUP:
                continue
            times.append(dt)
            want = truth[mode][i]
            hits += len(set(rows.tolist()) & set(want.tolist()))
            got_k += len(rows) == K
        m = len(times)
        out[mode] = {**summary(times), "recall_at_10": round(hits / (K * m), 4) if m else None,
                     "returned_k_share": round(got_k / m, 4) if m else None}
    return out


def batched(idx, queries: np.ndarray, seen: list[np.ndarray], batch: int, calls: int) -> dict:
    """`search_batch` of `batch` queries per call (as `recommend_many` makes), the seen rows of all
    of them excluded: the time per call and per query."""
    times = []
    for c in range(calls + 1):
        qs = [i % len(queries) for i in range(c * batch, (c + 1) * batch)]
        t = time.perf_counter()
        idx.search_batch(queries[qs], K, exclude=np.concatenate([seen[i] for i in qs]))
        if c:  # the first call is a warm-up
            times.append(time.perf_counter() - t)
    per_call = summary(times)
    return {"batch": batch, "calls": len(times), "p50_ms_per_call": per_call.get("p50_ms"),
            "p50_ms_per_query": round(per_call["p50_ms"] / batch, 2) if times else None}


def run_faiss(kind: str, x: np.ndarray, args, data) -> dict:
    gc.collect()
    before = rss_bytes()
    idx = VectorIndex(x.shape[1], kind, ef_search=args.ef_search)
    t = time.perf_counter()
    idx.build(np.arange(len(x)), x)
    build = time.perf_counter() - t
    grew = rss_bytes() - before
    with tempfile.TemporaryDirectory() as d:
        idx.save(Path(d) / "i.faiss")
        disk = (Path(d) / "i.faiss").stat().st_size
    res = {"backend": "faiss", "kind": kind, "build_s": round(build, 2), "rss_growth_mb": round(grew / 2**20, 1),
           "disk_mb": round(disk / 2**20, 1),
           **measure(idx, x, *data[:3], n_plain=args.queries, n_filtered=args.queries, truth=data[-1])}
    del idx
    gc.collect()
    return res


def run_milvus(kind: str, x: np.ndarray, args, data, workdir: Path) -> dict:
    from engine.serving.milvus import MilvusHome, MilvusIndex

    db = workdir / f"bench-{kind}.db"
    gc.collect()
    before = rss_bytes()
    home = MilvusHome(args.milvus_uri or str(db))
    try:
        idx = MilvusIndex(home, x.shape[1], kind, ef_search=args.ef_search)
        t = time.perf_counter()
        idx.build(np.arange(len(x)), x)
        inserted = time.perf_counter() - t
        wait_indexed(idx)
        build = time.perf_counter() - t
        grew = rss_bytes() - before
        res = {"backend": "milvus-server" if args.milvus_uri else "milvus-lite", "kind": kind,
               "build_s": round(build, 2), "insert_s": round(inserted, 2), "rss_growth_mb": round(grew / 2**20, 1),
               "disk_mb": None if args.milvus_uri else round(dir_bytes(db) / 2**20, 1),
               **measure(idx, x, *data[:3], n_plain=args.milvus_queries, n_filtered=args.milvus_filtered,
                         truth=data[-1])}
        if args.milvus_batch > 1:
            res["batched"] = batched(idx, data[0], data[1], args.milvus_batch, args.milvus_batch_calls)
    finally:  # no drop on Lite: it can fail one that races its background index build
        if args.milvus_uri:
            home.drop_all()
        home.close()
        shutil.rmtree(db, ignore_errors=True)
    return res


def one_size(n: int, args, centres: np.ndarray, workdir: Path, log, save) -> dict:
    x, cluster = synthetic(centres, n, seed=0)
    nq = max(args.queries, args.milvus_queries) + WARMUP
    queries, _ = synthetic(centres, nq, seed=1)
    rng = np.random.default_rng(2)
    seen = [rng.choice(n, SEEN, replace=False) for _ in range(nq)]
    ok = rng.random(n) < 0.10  # a filter that lets 10% of the rows through
    truth = {"plain": [exact_top(x, queries[i], seen[i], None) for i in range(nq)],
             "filtered": [exact_top(x, queries[i], seen[i], ok) for i in range(nq)]}
    data = (queries, seen, ok, truth)
    size = {"items": n, "dim": int(x.shape[1]), "rows": []}
    # Each kind on both backends one after the other, so that a change of load hits both alike
    # and an interrupted run keeps pairs (the results are saved after every row).
    for kind in dict.fromkeys(args.faiss_kinds + args.milvus_kinds):
        for backend in ("faiss", "milvus"):
            if kind not in (args.faiss_kinds if backend == "faiss" else args.milvus_kinds):
                continue
            log(f"  {n:,} {backend} {kind} ...")
            row = run_faiss(kind, x, args, data) if backend == "faiss" else run_milvus(kind, x, args, data, workdir)
            size["rows"].append({**row, "load_after": load()})
            save(size)
    return size


def table(result: dict) -> str:
    lines = []
    for size in result["sizes"]:
        lines += [f"\n{size['items']:,} items, {size['dim']} dims, k={K}, {SEEN} seen rows excluded\n",
                  "| backend | index | build s | RSS +MB | disk MB | p50 ms | p99 ms | recall@10 | "
                  "filtered p50 ms | filtered p99 ms | filtered recall@10 | queries | batched ms/query |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in size["rows"]:
            p, f = r["plain"], r["filtered"]
            lines.append(f"| {r['backend']} | {r['kind']} | {r['build_s']} | {r['rss_growth_mb']} | {r['disk_mb']} | "
                         f"{p.get('p50_ms')} | {p.get('p99_ms')} | {p.get('recall_at_10')} | {f.get('p50_ms')} | "
                         f"{f.get('p99_ms')} | {f.get('recall_at_10')} | {p.get('n')}/{f.get('n')} | "
                         f"{(r.get('batched') or {}).get('p50_ms_per_query')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--queries", type=int, default=200, help="timed FAISS queries per mode")
    ap.add_argument("--milvus-queries", type=int, default=40, help="timed Milvus Lite plain queries")
    ap.add_argument("--milvus-filtered", type=int, default=10, help="timed Milvus Lite filtered queries")
    ap.add_argument("--faiss-kinds", nargs="+", default=["hnsw", "hnsw-sq8", "flat"])
    ap.add_argument("--milvus-kinds", nargs="+", default=["hnsw", "hnsw-sq8"])
    ap.add_argument("--ef-search", type=int, default=128)
    ap.add_argument("--milvus-uri", default=None,
                    help="a Milvus server (http://127.0.0.1:19530) instead of Milvus Lite; its collections are dropped")
    ap.add_argument("--milvus-batch", type=int, default=1,
                    help="also time search_batch with this many queries per call (recommend_many's path)")
    ap.add_argument("--milvus-batch-calls", type=int, default=5, help="timed batched calls")
    ap.add_argument("--out", type=Path, default=RESULTS / "backends-100k.json")
    args = ap.parse_args(argv)
    log = lambda m: print(m, flush=True)  # noqa: E731
    started = time.time()
    result = {"machine": machine(), "load_start": load(), "args": {k: str(v) for k, v in vars(args).items()},
              "sizes": []}
    centres = catalog_vectors(log)
    with tempfile.TemporaryDirectory(prefix="kindling-bench-milvus-") as d:
        def save(size: dict) -> None:
            done = [s for s in result["sizes"] if s["items"] != size["items"]] + [size]
            out = {**result, "sizes": done, "load_end": load(), "wall_s": round(time.time() - started, 1)}
            args.out.parent.mkdir(exist_ok=True)
            args.out.write_text(json.dumps(out, indent=1))
            args.out.with_suffix(".md").write_text(table(out) + "\n")

        for n in args.sizes:
            result["sizes"].append(one_size(n, args, centres, Path(d), log, save))
    print(table(result))


if __name__ == "__main__":
    main()

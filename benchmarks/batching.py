"""Micro-batching of POST /recommend: the service with batch windows side by side, after `fit`.

    python benchmarks/batching.py [--items 100000] [--windows 0,1,2,4] [--clients 8] [--requests 2000]
                                  [--rounds 2] [--out FILE]

A store of N clustered synthetic items (0 = the bundled movielens-small catalog) with 256 users of
20 clicks each (benchmarks/serve.py's `build`), fitted on those clicks. Then, in one run: the
in-process reference (`recommend` one user at a time, and `recommend_many` of 8 users, calls per
second), and for each `--batch-window-ms` a real `kindling serve` process (no load shedding) given
`--requests` POST /recommend from `--clients` keep-alive clients (serve.py's `load`): requests per
second and p50 / p99, and the mean batch from /metrics. The windows are run in turn, `--rounds`
times (the order rotated), so that a drift of the host shows as a spread, not as a difference.
Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import catalog_items, catalog_vectors, synthetic, synthetic_items, user_clicks  # noqa: E402
from bench_timing import finish  # noqa: E402
from serve import ROOT, USERS, CLICKS, build, free_port, load  # noqa: E402

from engine import Engine, Event  # noqa: E402


def fit(path: Path, n: int) -> dict:
    """Fit the store on the clicks `build` imported (the same users, items and order)."""
    vectors = catalog_vectors() if n == 0 else synthetic(catalog_vectors(), n, seed=0)[0]
    items = catalog_items() if n == 0 else synthetic_items(n)
    events = [Event(f"u{i}", items[int(r)].item_id, "click", 1.0, 1_700_000_000 + j)
              for i, rows in enumerate(user_clicks(vectors, USERS, CLICKS, seed=1)) for j, r in enumerate(rows)]
    with Engine.open(path) as eng:
        t = time.perf_counter()
        summary = eng.fit(events, progress=False)
        return {"fit_s": round(time.perf_counter() - t, 1), "reranker": summary.get("reranker")}


def in_process(path: Path, users: list[str], requests: int) -> dict:
    with Engine.open(path, read_only=True) as eng:
        for u in users[:20]:
            eng.recommend(u, k=10)
        t = time.perf_counter()
        for i in range(requests):
            eng.recommend(users[i % len(users)], k=10)
        single = requests / (time.perf_counter() - t)
        t = time.perf_counter()
        for s in range(0, requests, 8):
            eng.recommend_many([users[(s + j) % len(users)] for j in range(8)], k=10)
        many = requests / (time.perf_counter() - t)
    return {"recommend_per_s": round(single, 1), "recommend_many_8_per_s": round(many, 1),
            "ratio": round(many / single, 3)}


def serve(path: Path, window_ms: float, users: list[str], clients: int, requests: int) -> dict:
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "serve", str(path), "--port", str(port),
                             "--max-queue", "0", "--batch-window-ms", str(window_ms)],
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                if time.time() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"kindling serve did not come up: {proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.2)
        load(f"{base}/recommend", [{"user_id": users[i % len(users)], "k": 10} for i in range(200)], clients)
        out = load(f"{base}/recommend", [{"user_id": users[i % len(users)], "k": 10} for i in range(requests)],
                   clients)
        text = httpx.get(f"{base}/metrics", timeout=10).text
        calls = int(re.search(r"^kindling_recommend_calls_total (\d+)", text, re.M).group(1))
        batches = int(re.search(r"^kindling_recommend_batches_total (\d+)", text, re.M).group(1))
        out["mean_batch"] = round(calls / batches, 2) if batches else 1.0
        return out
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000, help="catalog size; 0 = the bundled catalog")
    parser.add_argument("--windows", default="0,1,2,4", help="--batch-window-ms values, in ms")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    windows = [float(w) for w in args.windows.split(",")]
    result: dict = {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()],
                    "items": args.items, "clients": args.clients, "runs": {str(w): [] for w in windows}}
    with tempfile.TemporaryDirectory(prefix="kindling-batching-bench-") as tmp:
        path = Path(tmp) / "store"
        users = build(path, args.items)
        result["fit"] = fit(path, args.items)
        result["in_process"] = in_process(path, users, args.requests)
        print(json.dumps({"fit": result["fit"], "in_process": result["in_process"]}), flush=True)
        for r in range(args.rounds):
            for w in windows[r % len(windows):] + windows[:r % len(windows)]:
                run = serve(path, w, users, args.clients, args.requests)
                result["runs"][str(w)].append(run)
                print(json.dumps({"window_ms": w, "round": r, **run}), flush=True)
    finish(result, args.out)


if __name__ == "__main__":
    main()

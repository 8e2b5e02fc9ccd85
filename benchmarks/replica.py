"""Replica follow delay: how long a click recorded by the writer takes to show on every replica.

    python benchmarks/replica.py [--replicas 1,3] [--clicks 400] [--rate 40] [--interval 0.01]
                                 [--serve-rate 0] [--save-every 0] [--items 0] [--out FILE]

A store of the bundled catalog (9,742 items with their real MiniLM vectors; or --items N
synthetic ones) with 256 users of 20 clicks is built once. For each replica count R, R processes
open it with `Engine.open(read_only=True, follow=True, follow_interval_s=--interval)`; each may
also serve `recommend` at --serve-rate calls per second from a second thread. This process is the
writer (`Engine.open`, fsync on): it records --clicks clicks, each by a user never seen before,
at --rate per second, and notes the wall-clock time each `record()` returned (acknowledged).
Each replica watches for the clicks in order (`user_history(user)` succeeding, checked every
0.5 ms) and notes when each became visible. The delay of a click on a replica is that time
minus its acknowledgement (all processes read the same host clock); p50 / p95 / p99 / max over
every click on every replica (`delay_from_call`: from the call to `record()` instead; the
replica can see a record before the writer's fsync returns, so `delay` can be below zero). --save-every N makes the writer save a snapshot after every N
clicks (the replicas then load the new generation). Prints one JSON object (also to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_timing import finish, summary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
USERS, CLICKS = 256, 20


def build(path: Path, n: int) -> list[str]:
    """The store (as benchmarks/serve.py builds it); returns its item ids."""
    from bench_data import catalog_items, synthetic_items
    from serve import build as serve_build

    serve_build(path, n)
    return [i.item_id for i in (catalog_items() if n == 0 else synthetic_items(n))]


def replica(store: str, prefix: str, n: int, interval: float, serve_rate: float, timeout: float) -> None:
    """One replica process: follow, watch for the clicks `prefix`0 .. n-1, print when each showed."""
    from engine import Engine, UnknownUserError

    eng = Engine.open(store, read_only=True, follow=True, follow_interval_s=interval)
    eng.recommend("u0", k=10)  # warm: caches, FAISS
    stop = threading.Event()
    served = [0]

    def serve() -> None:
        rng = np.random.default_rng(os.getpid())
        while not stop.is_set():
            eng.recommend(f"u{int(rng.integers(USERS))}", k=10)
            served[0] += 1
            stop.wait(1.0 / serve_rate)

    server = threading.Thread(target=serve, daemon=True) if serve_rate > 0 else None
    if server:
        server.start()
    print("ready", flush=True)
    seen: list[float] = []
    last_progress = time.time()
    while len(seen) < n and time.time() - last_progress < timeout:
        try:
            eng.user_history(f"{prefix}{len(seen)}")
        except UnknownUserError:
            time.sleep(0.0005)
            continue
        seen.append(time.time())
        last_progress = seen[-1]
    stop.set()
    lag = eng.replica_lag()
    eng.close()
    print(json.dumps({"seen": seen, "served": served[0], "lag": lag}), flush=True)


def run_once(store: Path, item_ids: list[str], replicas: int, args: argparse.Namespace) -> dict:
    from engine import Engine

    prefix = f"p{replicas}-{time.time_ns()}-"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, __file__, "--role", "replica", "--store", str(store),
                               "--prefix", prefix, "--clicks", str(args.clicks), "--interval", str(args.interval),
                               "--serve-rate", str(args.serve_rate)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(replicas)]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise RuntimeError(f"a replica did not start: {p.stderr.read()[-2000:]}")
    rng = np.random.default_rng(replicas)
    called, acked, record_s = [], [], []
    saves = 0
    with Engine.open(store) as writer:
        gap = 1.0 / args.rate
        t_next = time.time()
        for i in range(args.clicks):
            t_next += gap
            called.append(time.time())
            t0 = time.perf_counter()
            writer.record(f"{prefix}{i}", item_ids[int(rng.integers(len(item_ids)))])
            record_s.append(time.perf_counter() - t0)
            acked.append(time.time())
            if args.save_every and (i + 1) % args.save_every == 0:
                writer.save()
                saves += 1
            time.sleep(max(0.0, t_next - time.time()))
        outs = [json.loads(p.communicate(timeout=120)[0].strip().splitlines()[-1]) for p in procs]
    delays = [s - a for out in outs for s, a in zip(out["seen"], acked)]
    missing = sum(args.clicks - len(out["seen"]) for out in outs)
    from_call = [s - c for out in outs for s, c in zip(out["seen"], called)]
    return {"replicas": replicas, "clicks": args.clicks, "delay": summary(delays),
            "delay_from_call": summary(from_call),
            "delay_max_ms": round(max(delays) * 1e3, 3) if delays else None,
            "per_replica_p99_ms": [summary([s - a for s, a in zip(o["seen"], acked)]).get("p99_ms") for o in outs],
            "not_seen": missing, "writer_record": summary(record_s), "saves": saves,
            "recommends_served": [o["served"] for o in outs], "reloads": [o["lag"]["reloads"] for o in outs],
            "errors": [o["lag"]["error"] for o in outs if o["lag"]["error"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--role", choices=["main", "replica"], default="main", help=argparse.SUPPRESS)
    parser.add_argument("--store", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", help=argparse.SUPPRESS)
    parser.add_argument("--replicas", default="1,3", help="replica process counts, one run each")
    parser.add_argument("--clicks", type=int, default=400, help="clicks the writer records per run")
    parser.add_argument("--rate", type=float, default=40.0, help="clicks per second")
    parser.add_argument("--interval", type=float, default=0.01, help="the replicas' follow_interval_s")
    parser.add_argument("--serve-rate", type=float, default=0.0, help="recommend calls per second per replica")
    parser.add_argument("--save-every", type=int, default=0, help="the writer saves after every N clicks")
    parser.add_argument("--items", type=int, default=0, help="0 = the bundled catalog, else N synthetic items")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    if args.role == "replica":
        replica(args.store, args.prefix, args.clicks, args.interval, args.serve_rate, timeout=60)
        return
    result = {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()],
              "settings": {k: v for k, v in vars(args).items() if k not in ("role", "store", "prefix", "out")},
              "runs": []}
    with tempfile.TemporaryDirectory(prefix="kindling-replica-bench-") as tmp:
        store = Path(tmp) / "store"
        item_ids = build(store, args.items)
        for r in [int(x) for x in args.replicas.split(",")]:
            result["runs"].append(run_once(store, item_ids, r, args))
            print(json.dumps(result["runs"][-1]), flush=True)
    finish(result, args.out)


if __name__ == "__main__":
    main()

"""The HTTP service against the in-process library, side by side in one run.

    python benchmarks/serve.py [--items 0,100000] [--clients 1,8,32] [--requests 400] [--replicas 1]
                               [--fit] [--workers 1,2] [--worker-requests 3000] [--serve-args ARGS]
                               [--skip-http] [--out FILE]

For each catalog (0 = the bundled movielens-small catalog with its real MiniLM vectors; N > 0 = a
clustered synthetic catalog of N items made from them, benchmarks/bench_data.py), a store is built
with 256 users of 20 clicks each and fsync on. Then, in one run: `Engine.recommend` in this
process (p50 / p99 one call at a time, and calls per second with 8 threads), the store closed, a
real `kindling serve` process started on it, and `POST /recommend` and `POST /events` from 1, 8 and
32 concurrent keep-alive clients (asyncio on raw sockets; requests per second, p50 / p99 per
request); then `POST /recommend` from 8 clients spread over the writer and `--replicas` read
replicas (`kindling serve --replica`) of its store; then, for each count of `--workers`, one
`kindling serve --workers N` on the store and `POST /recommend` from 8 clients (after a warm-up
pass; throughput, p50 / p99 and CPU, with the connections where the kernel put them and then
spread evenly), beside what the host gives N CPU-bound processes against one. With
`--fit` the store is trained first (`Engine.fit` on the users' clicks) and every part runs on the
trained store; `--skip-http` leaves out the single server's client counts and the replicas.
Every connection sends one untimed request before the clock starts. Prints one JSON object (also
written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import LookupEncoder, catalog_items, catalog_vectors, synthetic, user_clicks  # noqa: E402
from bench_data import synthetic_items  # noqa: E402
from bench_timing import finish, summary, throughput  # noqa: E402

from engine import Config, Engine, Event  # noqa: E402

USERS, CLICKS = 256, 20
ADD_CHUNK = 20_000
ROOT = Path(__file__).resolve().parent.parent


def build(path: Path, n: int, fit: bool = False) -> list[str]:
    """A store of the bundled catalog (n = 0) or n synthetic items, with USERS users' clicks
    (trained on them with `fit`); returns the user ids."""
    centres = catalog_vectors()
    if n == 0:
        items, vectors = catalog_items(), centres
        encoder = LookupEncoder(vectors, fallback=None)
    else:
        vectors, _ = synthetic(centres, n, seed=0)
        items, encoder = synthetic_items(n), LookupEncoder(vectors)
    eng = Engine.create(path, config=Config(seed=0), encoder=encoder)
    for s in range(0, len(items), ADD_CHUNK):  # one logged record per chunk (records are bounded)
        eng.add_items(items[s:s + ADD_CHUNK], vectors=vectors[s:s + ADD_CHUNK])
    users = [f"u{i}" for i in range(USERS)]
    events = [Event(u, items[int(r)].item_id, "click", 1.0, 1_700_000_000 + j)
              for u, rows in zip(users, user_clicks(vectors, USERS, CLICKS, seed=1)) for j, r in enumerate(rows)]
    eng.import_events(events)
    if fit:
        eng.fit(events, progress=False)
    eng.close()
    return users


def in_process(path: Path, users: list[str], requests: int) -> dict:
    eng = Engine.open(path)
    try:
        pick = [users[i % len(users)] for i in range(requests)]
        for u in pick[:20]:
            eng.recommend(u, k=10)
        lat = []
        for u in pick:
            t = time.perf_counter()
            eng.recommend(u, k=10)
            lat.append(time.perf_counter() - t)
        qps8 = throughput(lambda u: eng.recommend(u, k=10), pick, threads=8)
        return {"recommend": summary(lat), "recommend_qps_8_threads": round(qps8, 1)}
    finally:
        eng.close(save=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(path: Path, port: int, replica: bool = False, workers: int = 1,
                 extra: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # No load shedding: the closed loops here (up to 32 clients) bound the queue themselves, and a
    # 503 would stop the run; benchmarks/shed.py measures the limit.
    args = [sys.executable, "-m", "engine.cli", "serve", str(path), "--port", str(port), "--max-queue", "0"]
    args += ["--replica"] if replica else []
    args += ["--workers", str(workers)] if workers > 1 else []
    args += extra or []
    # stderr to a file, not a pipe nobody reads: the workers' access logs would fill a pipe and block
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)
    import httpx

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        log.seek(0)
        ready = workers == 1 or f"served by {workers} workers".encode() in log.read()
        try:
            if ready and httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    log.seek(0)
    raise RuntimeError(f"kindling serve did not come up: {log.read().decode()[-2000:]}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and of every process below it (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def over_workers(path: Path, users: list[str], counts: list[int], requests: int,
                 serve_args: list[str]) -> dict:
    """POST /recommend from 8 clients on `kindling serve --workers N`, for each N of `counts` in
    that order (a count given twice runs twice: "1,2,1,2" shows the drift of a shared host).

    Each server is measured twice: with the 8 connections where the kernel put them (its hash of
    each connection picks the worker: what clients get), then with 8 / N connections on each worker
    (what the workers can do). For each: throughput, p50 / p99, the CPU the server's processes
    used (per request, and cores busy over the run) and the load generator's."""
    out: dict = {}
    for run, n in enumerate(counts):
        port = free_port()
        proc = start_server(path, port, workers=n, extra=serve_args)
        base = f"http://127.0.0.1:{port}"
        key = f"{n} worker{'s' if n > 1 else ''}" + (f" (run {run + 1})" if counts.count(n) > 1 else "")
        out[key] = {"workers": n, "load_1min_before": round(os.getloadavg()[0], 2)}
        try:
            rec = [{"user_id": users[i % len(users)], "k": 10} for i in range(requests)]
            load(f"{base}/recommend", rec[: requests // 5], 8, spread=n)  # warm-up: every worker's first requests
            for mode, spread in (("as_connected", 0), ("balanced", n)):
                if mode == "balanced" and n == 1:
                    continue
                server_cpu, own_cpu, wall = cpu_seconds(proc.pid), time.process_time(), time.perf_counter()
                result = load(f"{base}/recommend", rec, 8, spread=spread)
                wall = time.perf_counter() - wall
                server_cpu, own_cpu = cpu_seconds(proc.pid) - server_cpu, time.process_time() - own_cpu
                out[key][mode] = {**result, "server_cpu_ms_per_request": round(server_cpu / len(rec) * 1e3, 3),
                                  "server_cores_busy": round(server_cpu / wall, 2),
                                  "load_generator_cores_busy": round(own_cpu / wall, 2)}
            out[key]["load_1min_after"] = round(os.getloadavg()[0], 2)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    ones = [v["as_connected"]["rps"] for v in out.values() if v["workers"] == 1]
    for value in out.values():
        for mode in ("as_connected", "balanced"):
            if ones and mode in value:
                value[mode]["rps_vs_1_worker"] = round(value[mode]["rps"] / (sum(ones) / len(ones)), 2)
    return out


SPIN = """import time
t, n = time.perf_counter(), 0
while time.perf_counter() - t < {seconds}:
    for _ in range(10_000):
        n += 1
print(n)
"""


def cpu_scaling(processes: int = 2, seconds: float = 3.0) -> dict:
    """What this host gives `processes` CPU-bound Python processes at once against one alone: the
    ceiling for `--workers` here (a shared host, or vCPUs that are one core's hyperthreads, give
    less than `processes` x)."""
    def spin(k: int) -> int:
        procs = [subprocess.Popen([sys.executable, "-c", SPIN.format(seconds=seconds)], stdout=subprocess.PIPE)
                 for _ in range(k)]
        return sum(int(p.communicate()[0]) for p in procs)
    one, many = spin(1), spin(processes)
    return {"processes": processes, "loops_one": one, "loops_together": many, "ratio": round(many / one, 2)}
def load(url: str | list[str], bodies: list[dict], clients: int, spread: int = 0) -> dict:
    """`bodies` POSTed to `url` by `clients` concurrent keep-alive connections (client i to
    url[i % len(url)] when several servers are given).

    The load generator is asyncio on raw sockets in this one thread, with every request encoded
    before the clock starts: it costs tens of microseconds a request, where an httpx client in a
    thread per connection cost about a millisecond of the same two cores (the first version of
    this script). Each connection is opened and sends one untimed request before the clock starts.
    Each response must be a 200 with a Content-Length body. With `spread` (the workers behind one
    port), connections are opened until each worker (its X-Kindling-Worker header) holds
    clients / spread of them, instead of as the kernel spread them."""
    import asyncio
    from collections import Counter
    from urllib.parse import urlsplit

    urls = [url] if isinstance(url, str) else url
    chunks = [bodies[i::clients] for i in range(clients)]

    def request(body: dict, target: str) -> bytes:
        parts = urlsplit(target)
        host, port, path = parts.hostname, parts.port, parts.path
        data = json.dumps(body).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode() + data

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> str:
        """Send `req`, read the answer; the worker that gave it ("0" without the header)."""
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        fields = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:] if b":" in line)
        fields = {k.strip().lower(): v.strip() for k, v in fields.items()}
        body = await reader.readexactly(int(fields[b"content-length"]))
        if status != 200:
            raise RuntimeError(f"{req.split(b' ', 2)[1].decode()}: {status} {body[:200]!r}")
        return fields.get(b"x-kindling-worker", b"0").decode()

    async def connect(target: str, first: bytes, taken: Counter) -> tuple:
        quota = clients // spread if spread else clients
        for _ in range(1000):
            reader, writer = await asyncio.open_connection(urlsplit(target).hostname, urlsplit(target).port)
            worker = await one(reader, writer, first)  # warms the connection
            if taken[worker] < quota:
                taken[worker] += 1
                return reader, writer
            writer.close()
        raise RuntimeError(f"could not reach {spread} workers with {quota} connections each")

    async def client(reader, writer, reqs: list[bytes], lat: list[float]) -> None:
        try:
            for req in reqs:
                t = time.perf_counter()
                await one(reader, writer, req)
                lat.append(time.perf_counter() - t)
        finally:
            writer.close()

    async def run() -> tuple[list[float], float, Counter]:
        lat: list[float] = []
        taken: Counter = Counter()
        work = [(urls[i % len(urls)], ch) for i, ch in enumerate(chunks) if ch]
        reqs = [(target, [request(b, target) for b in ch]) for target, ch in work]
        conns = [await connect(target, r[0], taken) for target, r in reqs]
        t = time.perf_counter()
        await asyncio.gather(*(client(*conn, r[1:], lat) for conn, (_, r) in zip(conns, reqs)))
        return lat, time.perf_counter() - t, taken

    lat, wall, taken = asyncio.run(run())
    return {**summary(lat), "rps": round(len(lat) / wall, 1), "connections_by_worker": dict(sorted(taken.items()))}


def over_http(path: Path, users: list[str], item_ids: list[str], clients: list[int], requests: int,
              replicas: int) -> dict:
    port = free_port()
    proc = start_server(path, port)
    base = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(2)
    out: dict = {}
    try:
        for c in clients:
            rec = [{"user_id": users[i % len(users)], "k": 10} for i in range(requests)]
            ev = [{"user_id": f"b{c}-{i % 50}", "item_id": item_ids[int(rng.integers(len(item_ids)))]}
                  for i in range(requests)]
            out[f"{c} clients"] = {"recommend": load(f"{base}/recommend", rec, c),
                                   "events": load(f"{base}/events", ev, c)}
        if replicas:  # /recommend spread over the writer and `replicas` read replicas of its store
            ports = [free_port() for _ in range(replicas)]
            followers = [start_server(path, p, replica=True) for p in ports]
            try:
                urls = [f"{base}/recommend"] + [f"http://127.0.0.1:{p}/recommend" for p in ports]
                rec = [{"user_id": users[i % len(users)], "k": 10} for i in range(2 * requests)]
                out[f"8 clients, writer + {replicas} replica(s)"] = {"recommend": load(urls, rec, 8)}
            finally:
                for f in followers:
                    f.terminate()
                    f.wait(timeout=60)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="0,100000", help="catalog sizes; 0 = the bundled catalog")
    parser.add_argument("--clients", default="1,8,32")
    parser.add_argument("--requests", type=int, default=400, help="requests per client count and route")
    parser.add_argument("--replicas", type=int, default=1,
                        help="also /recommend from 8 clients spread over the writer and this many "
                             "`kindling serve --replica` processes (0: skip)")
    parser.add_argument("--fit", action="store_true",
                        help="train the store (Engine.fit on the users' clicks) before anything is measured")
    parser.add_argument("--workers", default="1,2",
                        help="also /recommend from 8 clients on `kindling serve --workers N` for each N "
                             "(comma-separated, run in this order; empty: skip)")
    parser.add_argument("--worker-requests", type=int, default=3000,
                        help="timed /recommend requests per --workers count (a fifth more as warm-up)")
    parser.add_argument("--serve-args", default="",
                        help="more `kindling serve` options for the --workers runs, e.g. '--batch-window-ms 0'")
    parser.add_argument("--skip-http", action="store_true",
                        help="skip the single-server client counts and the replicas (only in-process and --workers)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    result = {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()], "fit": args.fit,
              "runs": {}}
    for n in [int(x) for x in args.items.split(",")]:
        with tempfile.TemporaryDirectory(prefix="kindling-serve-bench-") as tmp:
            path = Path(tmp) / "store"
            t = time.perf_counter()
            users = build(path, n, fit=args.fit)
            built_s = round(time.perf_counter() - t, 1)
            eng = Engine.open(path, read_only=True)
            item_ids = [r.item_id for r in eng.similar_items(eng.user_history(users[0])[0], k=200)]
            eng.close(save=False)
            name = "bundled" if n == 0 else f"{n} items"
            run: dict = {"build_s": built_s, "in_process": in_process(path, users, args.requests)}
            if not args.skip_http:
                run["http"] = over_http(path, users, item_ids, clients, args.requests, args.replicas)
            if workers:
                scaling = cpu_scaling(max(workers))
                run["workers"] = over_workers(path, users, workers, args.worker_requests,
                                              shlex.split(args.serve_args))
                run["host_cpu_scaling"] = {"before": scaling, "after": cpu_scaling(max(workers))}
            result["runs"][name] = run
            print(json.dumps({name: result["runs"][name]}), flush=True)
    finish(result, args.out)


if __name__ == "__main__":
    main()

"""The HTTP service against the in-process library, side by side in one run.

    python benchmarks/serve.py [--items 0,100000] [--clients 1,8,32] [--requests 400] [--replicas 1]
                               [--out FILE]

For each catalog (0 = the bundled movielens-small catalog with its real MiniLM vectors; N > 0 = a
clustered synthetic catalog of N items made from them, benchmarks/bench_data.py), a store is built
with 256 users of 20 clicks each and fsync on. Then, in one run: `Engine.recommend` in this
process (p50 / p99 one call at a time, and calls per second with 8 threads), the store closed, a
real `kindling serve` process started on it, and `POST /recommend` and `POST /events` from 1, 8 and
32 concurrent keep-alive clients (asyncio on raw sockets; requests per second, p50 / p99 per
request); then `POST /recommend` from 8 clients spread over the writer and `--replicas` read
replicas (`kindling serve --replica`) of its store. Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
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


def build(path: Path, n: int) -> list[str]:
    """A store of the bundled catalog (n = 0) or n synthetic items, with USERS users' clicks;
    returns the user ids."""
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


def start_server(path: Path, port: int, replica: bool = False) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # No load shedding: the closed loops here (up to 32 clients) bound the queue themselves, and a
    # 503 would stop the run; benchmarks/shed.py measures the limit.
    args = [sys.executable, "-m", "engine.cli", "serve", str(path), "--port", str(port), "--max-queue", "0"]
    proc = subprocess.Popen(args + (["--replica"] if replica else []),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"kindling serve did not come up: {proc.stderr.read().decode()[-2000:]}")


def load(url: str | list[str], bodies: list[dict], clients: int) -> dict:
    """`bodies` POSTed to `url` by `clients` concurrent keep-alive connections (client i to
    url[i % len(url)] when several servers are given).

    The load generator is asyncio on raw sockets in this one thread, with every request encoded
    before the clock starts: it costs tens of microseconds a request, where an httpx client in a
    thread per connection cost about a millisecond of the same two cores (the first version of
    this script). Each response must be a 200 with a Content-Length body."""
    import asyncio
    from urllib.parse import urlsplit

    urls = [url] if isinstance(url, str) else url
    chunks = [bodies[i::clients] for i in range(clients)]

    def request(body: dict, target: str) -> bytes:
        parts = urlsplit(target)
        host, port, path = parts.hostname, parts.port, parts.path
        data = json.dumps(body).encode()
        return (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode() + data

    async def one(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> None:
        writer.write(req)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await reader.readexactly(length)
        if status != 200:
            raise RuntimeError(f"{req.split(b' ', 2)[1].decode()}: {status} {body[:200]!r}")

    async def client(target: str, reqs: list[bytes], lat: list[float]) -> None:
        reader, writer = await asyncio.open_connection(urlsplit(target).hostname, urlsplit(target).port)
        try:
            await one(reader, writer, reqs[0])  # warm the connection
            for req in reqs[1:]:
                t = time.perf_counter()
                await one(reader, writer, req)
                lat.append(time.perf_counter() - t)
        finally:
            writer.close()

    async def run() -> tuple[list[float], float]:
        lat: list[float] = []
        work = [(urls[i % len(urls)], ch) for i, ch in enumerate(chunks) if ch]
        reqs = [(target, [request(b, target) for b in ch]) for target, ch in work]
        t = time.perf_counter()
        await asyncio.gather(*(client(target, r, lat) for target, r in reqs))
        return lat, time.perf_counter() - t

    lat, wall = asyncio.run(run())
    return {**summary(lat), "rps": round(len(lat) / wall, 1)}


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
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    result = {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()], "runs": {}}
    for n in [int(x) for x in args.items.split(",")]:
        with tempfile.TemporaryDirectory(prefix="kindling-serve-bench-") as tmp:
            path = Path(tmp) / "store"
            users = build(path, n)
            eng = Engine.open(path, read_only=True)
            item_ids = [r.item_id for r in eng.similar_items(eng.user_history(users[0])[0], k=200)]
            eng.close(save=False)
            name = "bundled" if n == 0 else f"{n} items"
            result["runs"][name] = {"in_process": in_process(path, users, args.requests),
                                    "http": over_http(path, users, item_ids, clients, args.requests,
                                                      args.replicas)}
            print(json.dumps({name: result["runs"][name]}), flush=True)
    finish(result, args.out)


if __name__ == "__main__":
    main()

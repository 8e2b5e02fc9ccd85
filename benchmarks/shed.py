"""Load shedding: `/recommend` offered at 1x and 2x the service's capacity, with and without
`kindling serve --max-queue`, side by side in one run.

    python benchmarks/shed.py [--items 0] [--loads 1,2] [--seconds 6] [--max-queue 0,32] [--out FILE]

A store is built as benchmarks/serve.py builds it (0 = the bundled catalog with its real MiniLM
vectors; 256 users of 20 clicks, fsync on). For each `--max-queue` (0 = no limit, i.e. no
shedding) a fresh `kindling serve` is started and warmed up by a closed loop of 8 keep-alive
clients sending `POST /recommend` k=10; that loop's req/s on the first setting is the capacity.
Then each server is offered each multiple of that capacity for `--seconds`, open loop:
requests are due at evenly spaced times whatever the answers, each sent on an idle keep-alive
connection (up to 512; asyncio on raw sockets). A request's latency runs from the time it was
due, so a wait for a connection in the client counts, and a run lasts until every request is
answered. Reported for each setting and load:
offered and admitted req/s, the share shed (503), p50/p95/p99 of the admitted requests (200) and
the p50 of a 503. Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_timing import finish, machine, summary  # noqa: E402
from serve import ROOT, build, free_port, load  # noqa: E402

#: Most connections the open-loop client holds; a request due with none idle waits for one.
POOL = 512
WARMUP = 200


def start(path: Path, port: int, max_queue: int) -> subprocess.Popen:
    """`kindling serve STORE --max-queue N`, returned once /healthz answers."""
    import httpx

    args = [sys.executable, "-m", "engine.cli", "serve", str(path), "--port", str(port), "--max-queue", str(max_queue)]
    proc = subprocess.Popen(args, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("kindling serve did not come up")


def request(port: int, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, req: bytes) -> int:
    """Send `req` on the connection and read the whole response; its status code."""
    writer.write(req)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return int(head.split(b" ", 2)[1])


async def open_loop(port: int, reqs: list[bytes], rate: float) -> tuple[list[tuple[int, float]], float, int]:
    """`reqs` sent at `rate` a second, each when due; (status, seconds from due to answered) for
    each, the seconds from the first due time to the last answer, and the connections opened."""
    loop = asyncio.get_running_loop()
    idle: asyncio.Queue = asyncio.Queue()
    opened = 0

    async def connection() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        nonlocal opened
        if idle.empty() and opened < POOL:
            opened += 1
            return await asyncio.open_connection("127.0.0.1", port)
        return await idle.get()

    async def one(req: bytes, due: float) -> tuple[int, float]:
        conn = await connection()
        status = await answer(*conn, req)
        idle.put_nowait(conn)
        return status, loop.time() - due

    start = loop.time()
    tasks = []
    for i, req in enumerate(reqs):
        due = start + i / rate
        if due > loop.time():
            await asyncio.sleep(due - loop.time())
        tasks.append(asyncio.create_task(one(req, due)))
    results = await asyncio.gather(*tasks)
    wall = loop.time() - start
    while not idle.empty():
        idle.get_nowait()[1].close()
    return results, wall, opened


def offered(port: int, bodies: list[dict], rate: float) -> dict:
    reqs = [request(port, b) for b in bodies]
    results, wall, opened = asyncio.run(open_loop(port, reqs, rate))
    ok = [s for code, s in results if code == 200]
    shed = [s for code, s in results if code == 503]
    other = sorted({code for code, _ in results} - {200, 503})
    return {"offered_rps": round(rate, 1), "requests": len(results), "admitted_rps": round(len(ok) / wall, 1),
            "shed_share": round(len(shed) / len(results), 4), "admitted": summary(ok),
            "shed_p50_ms": summary(shed).get("p50_ms"), "other_statuses": other, "connections": opened,
            "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=0, help="catalog size; 0 = the bundled catalog")
    parser.add_argument("--loads", default="1,2", help="offered load as multiples of the measured capacity")
    parser.add_argument("--seconds", type=float, default=6.0, help="how long each load is offered")
    parser.add_argument("--max-queue", default="0,32", help="the settings compared; 0 = no limit")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    loads = [float(x) for x in args.loads.split(",")]
    limits = [int(x) for x in args.max_queue.split(",")]
    result: dict = {"machine": machine(), "load_before": [round(x, 2) for x in os.getloadavg()],
                    "args": vars(args) | {"out": str(args.out) if args.out else None}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="kindling-shed-bench-") as tmp:
        path = Path(tmp) / "store"
        users = build(path, args.items)

        def bodies(n: int, offset: int = 0) -> list[dict]:
            return [{"user_id": users[(offset + i) % len(users)], "k": 10} for i in range(n)]
        for limit in limits:
            port = free_port()
            proc = start(path, port, limit)
            try:
                url = f"http://127.0.0.1:{port}/recommend"
                clients = min(8, limit or 8)  # a closed loop past the limit would be shed
                closed = load(url, bodies(WARMUP + clients * 100), clients)  # the warm-up, and the capacity
                if "capacity_rps" not in result:
                    result["capacity_rps"] = closed["rps"]
                    result["closed_loop_8_clients"] = closed
                runs = {}
                for x in loads:
                    rate = x * result["capacity_rps"]
                    runs[f"{x:g}x"] = offered(port, bodies(int(rate * args.seconds), offset=17), rate)
                    print(json.dumps({f"max_queue={limit}, {x:g}x": runs[f"{x:g}x"]}), flush=True)
                result["runs"][f"max_queue={limit}"] = runs
            finally:
                proc.terminate()
                proc.wait(timeout=120)
    finish(result, args.out)


if __name__ == "__main__":
    main()

"""`record(click)` back to back, and after whatever runs between two events.

    python benchmarks/record_gap.py [--items 100000] [--events 300] [--out FILE]

A flat store of N synthetic items (bench_data; 256 users of 20 clicks; fsync on). Then `record`
of a new user's click, 300 times in each mode, with between two calls: nothing (back to back),
a `recommend` for that user, a 20 ms sleep, a pass over 80 MB of memory, or 200 small matrix
products. Timing wrappers split each call into the log write, the apply (under the write lock)
and the fsync. On a host whose core slows down or loses its caches when it does something else
(or nothing), every part of `record` is slower in the modes with a gap, the fsync included: the
gap, not the catalog's size, sets `record`'s tail.

Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import LookupEncoder, catalog_vectors, synthetic, synthetic_items, user_clicks  # noqa: E402
from bench_timing import finish, method_timer, summary  # noqa: E402

from engine import Config, Engine, Event  # noqa: E402
from engine.storage.eventlog import EventLog  # noqa: E402

PARTS = [(EventLog, "write", "log write"), (Engine, "_apply", "apply"), (EventLog, "sync", "fsync")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--events", type=int, default=300)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        spent = {part: stack.enter_context(method_timer(owner, name)) for owner, name, part in PARTS}
        measure(args, spent)


def measure(args: argparse.Namespace, spent: dict[str, list[float]]) -> None:
    out: dict = {"items": args.items, "index": "flat", "fsync": True, "modes": {}}
    with tempfile.TemporaryDirectory(prefix="kindling-gap-") as tmp:
        vectors, _ = synthetic(catalog_vectors(), args.items, seed=0)
        items = synthetic_items(args.items)
        eng = Engine.create(Path(tmp) / "s", config=Config(seed=0, index="flat"), encoder=LookupEncoder(vectors))
        eng.ingest(items, progress=False)
        eng.import_events([Event(f"u{i}", items[int(r)].item_id, "click", 1.0, 1_700_000_000 + j)
                           for i, rows in enumerate(user_clicks(vectors, 256, 20, seed=1)) for j, r in enumerate(rows)])
        del items
        big, small = np.ones(20_000_000, np.float32), np.ones((64, 64), np.float32)
        gaps = {"back to back": lambda user: None, "recommend": lambda user: eng.recommend(user, k=10),
                "sleep 20 ms": lambda user: time.sleep(0.02), "80 MB pass": lambda user: float(big.sum()),
                "small compute": lambda user: [small @ small for _ in range(200)]}
        rows = np.random.default_rng(7).choice(args.items, len(gaps) * (args.events + 20), replace=False)
        for m, (mode, gap) in enumerate(gaps.items()):
            lat = []
            for j, r in enumerate(rows[m * (args.events + 20):(m + 1) * (args.events + 20)]):
                user = f"g{m}-{j}"
                t = time.perf_counter()
                eng.record(user, f"s{r}", "click")
                lat.append(time.perf_counter() - t)
                gap(user)
            res = {"record": summary(lat[20:])}
            res.update({part: summary(v[-args.events:]) for part, v in spent.items()})
            for v in spent.values():
                v.clear()
            out["modes"][mode] = res
            print(json.dumps({mode: {k: (v["p50_ms"], v["p99_ms"]) for k, v in res.items()}}), flush=True)
        eng.close(save=False)
    finish(out, args.out)


if __name__ == "__main__":
    main()

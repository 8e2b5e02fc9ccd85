"""What the reranker's online step costs on the `record()` path, side by side with the step off.

    python benchmarks/online_step.py [--clicks 400] [--online-lr 0.01] [--out FILE]

Two stores of the bundled movielens-small catalog (the real MiniLM vectors, cached in
benchmarks/.cache/), with the ratings >= 4 imported and `fit` on them as `kindling demo` does:
one with `Config(online_lr=0)`, one with the given `online_lr` (the default Config otherwise,
fsync on). Then the same clicks go to both, interleaved in chunks of 25 so a change of load hits
both alike: training users each clicking an item of their own top 20 (among their candidates, so
the step runs) and, one in four, a random catalog item (mostly outside them: no step). Reported:
`record()` per click (p50/p95/p99, ms) on each store, and on the store with the step the time
spent in the step (`Ranker._online_step`: the candidate search, features and scores) and in its
SGD alone (`Reranker.partial_fit`), read by wrapping those two methods (read-only timers; these
two count the warm-up clicks too).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_timing as bt  # noqa: E402
from bench_data import CATALOG, catalog_items  # noqa: E402
from fit import TextLookup  # noqa: E402

from engine import Config, Engine  # noqa: E402
from engine.models.rerank import Reranker  # noqa: E402
from engine.serving.ranking import Ranker  # noqa: E402
from engine.text.catalog import read_events  # noqa: E402

CHUNK = 25
WARMUP = 20


def fitted(root: Path, name: str, config: Config, enc: TextLookup, events: list) -> Engine:
    eng = Engine.create(root / name, config, encoder=enc)
    eng.ingest(catalog_items(), progress=False)
    eng.import_events(events)
    t = time.perf_counter()
    eng.fit(events, progress=False)
    print(f"  {name}: fit in {time.perf_counter() - t:.0f} s", flush=True)
    return eng


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clicks", type=int, default=400)
    ap.add_argument("--online-lr", type=float, default=0.01)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if args.clicks < 1 or not args.online_lr > 0:
        ap.error("--clicks must be >= 1 and --online-lr > 0")
    enc = TextLookup()
    events = read_events(CATALOG, min_value=4.0)
    root = Path(tempfile.mkdtemp(prefix="kindling-online-step-"))
    try:
        stores = {"step off": fitted(root, "off", Config(online_lr=0.0), enc, events),
                  "step on": fitted(root, "on", Config(online_lr=args.online_lr), enc, events)}
        rng = np.random.default_rng(0)
        users = sorted({e.user_id for e in events})
        item_ids = [it.item_id for it in catalog_items()]
        plan = []  # (user, item): the same clicks for both stores
        probe = stores["step off"]
        for j in range(args.clicks + WARMUP):
            user = users[int(rng.integers(len(users)))]
            if j % 4 == 3:
                plan.append((user, item_ids[int(rng.integers(len(item_ids)))]))
            else:
                recs = probe.recommend(user, k=20)
                plan.append((user, recs[int(rng.integers(len(recs)))].item_id))
        spent: dict[str, list[float]] = {name: [] for name in stores}
        with bt.method_timer(Ranker, "_online_step") as steps, bt.method_timer(Reranker, "partial_fit") as sgd:
            for c0 in range(0, len(plan), CHUNK):
                for name, eng in stores.items():
                    for j in range(c0, min(c0 + CHUNK, len(plan))):
                        user, item = plan[j]
                        t = time.perf_counter()
                        eng.record(user, item, "click")
                        if j >= WARMUP:
                            spent[name].append(time.perf_counter() - t)
        result = {"clicks": args.clicks, "online_lr": args.online_lr, "fsync": True,
                  "record": {name: bt.summary(s) for name, s in spent.items()},
                  "online_step": bt.summary(steps), "partial_fit": bt.summary(sgd),
                  "steps_taken": len(sgd), "steps_tried": len(steps),
                  "machine": bt.machine(), "load": bt.load()}
        for eng in stores.values():
            eng.close(save=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bt.finish(result, args.out)


if __name__ == "__main__":
    main()

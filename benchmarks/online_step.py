"""What the reranker's online step costs on the `record()` path, side by side with the step off.

    python benchmarks/online_step.py [--clicks 400] [--online-lr 0.1] [--gap-ms 20] [--out FILE]

Two stores of the bundled movielens-small catalog (the real MiniLM vectors, cached in
benchmarks/.cache/), with the ratings >= 4 imported and `fit` on them as `kindling demo` does:
one with `Config(online_lr=0)`, one with the given `online_lr` (the default Config otherwise,
fsync on). Then the same clicks go to both, interleaved in chunks of 25 so a change of load hits
both alike: training users each clicking an item of their own top 20 (among their candidates, so
the step runs) and, one in four, a random catalog item (mostly outside them: no step).

Two phases: clicks back to back (the step worker competes with `record` for the GIL and falls
behind: the worst case), and clicks `--gap-ms` apart (a steady stream the worker keeps up with).
Reported per phase: `record()` per click (p50/p95/p99, ms) on each store; on the store with the
step, the lag from a click to its step (`Engine.stats()["online_steps"]`), the longest queue
seen, and the time `settle()` took for what was left at the end of the phase. Over both phases:
the time spent in the step's read (`Ranker.step_plan`: the candidate search, features and
scores) and in its SGD alone (`Reranker.partial_fit`), read by wrapping those two methods
(read-only timers; these count the warm-up clicks too).
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
from engine.runtime.state import State  # noqa: E402
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


def run_phase(stores: dict[str, Engine], plan: list[tuple[str, str]], gap_s: float) -> dict:
    """The plan's clicks to every store (chunks of CHUNK, interleaved), `gap_s` after each."""
    spent: dict[str, list[float]] = {name: [] for name in stores}
    on = stores["step on"]
    lags: list[float] = []
    queued: list[float] = []
    original_read, original_learn = State.next_step, State.learn

    def next_step(self, *a, **kw):  # the step's read: its click's time in the queue
        got = original_read(self, *a, **kw)
        if got is not None:
            queued.append(got[0].queued)
        return got

    def learn(self, *a, **kw):  # the step's end (steps run one at a time: reads and ends pair up)
        original_learn(self, *a, **kw)
        lags.append(time.monotonic() - queued.pop(0))

    State.next_step, State.learn = next_step, learn
    try:
        longest = clicks_to(stores, plan, gap_s, spent)
        t = time.perf_counter()
        left = on.stats()["online_steps"]["pending"]
        on.settle()
        settle_ms = round((time.perf_counter() - t) * 1e3, 3)
    finally:
        State.next_step, State.learn = original_read, original_learn
    return {"record": {name: bt.summary(s) for name, s in spent.items()}, "step_lag": bt.summary(lags),
            "longest_queue": longest, "left_at_end": left, "settle_ms": settle_ms}


def clicks_to(stores: dict[str, Engine], plan: list[tuple[str, str]], gap_s: float,
              spent: dict[str, list[float]]) -> int:
    """Record the plan; returns the longest queue of waiting steps seen on the "step on" store."""
    on = stores["step on"]
    longest = 0
    for c0 in range(0, len(plan), CHUNK):
        for name, eng in stores.items():
            for j in range(c0, min(c0 + CHUNK, len(plan))):
                user, item = plan[j]
                t = time.perf_counter()
                eng.record(user, item, "click")
                if j >= WARMUP:
                    spent[name].append(time.perf_counter() - t)
                if eng is on:
                    longest = max(longest, on.stats()["online_steps"]["pending"])
                if gap_s:
                    time.sleep(gap_s)
    return longest


def click_plan(probe: Engine, users: list[str], item_ids: list[str], rng: np.random.Generator,
               n: int) -> list[tuple[str, str]]:
    """(user, item) clicks, the same for both stores: three in four on the user's top 20 as the
    store without the step ranks it now, one in four on a random item."""
    plan = []
    for j in range(n):
        user = users[int(rng.integers(len(users)))]
        if j % 4 == 3:
            plan.append((user, item_ids[int(rng.integers(len(item_ids)))]))
        else:
            recs = probe.recommend(user, k=20)
            plan.append((user, recs[int(rng.integers(len(recs)))].item_id))
    return plan


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clicks", type=int, default=400)
    ap.add_argument("--online-lr", type=float, default=0.1)
    ap.add_argument("--gap-ms", type=float, default=20.0)
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
        result = {"clicks": args.clicks, "online_lr": args.online_lr, "fsync": True, "gap_ms": args.gap_ms}
        with bt.method_timer(Ranker, "step_plan") as reads, bt.method_timer(Reranker, "partial_fit") as sgd:
            for phase, gap in (("back to back", 0.0), (f"{args.gap_ms:g} ms apart", args.gap_ms / 1e3)):
                plan = click_plan(stores["step off"], users, item_ids, rng, args.clicks + WARMUP)
                result[phase] = run_phase(stores, plan, gap)
        result.update({"step_read": bt.summary(reads), "partial_fit": bt.summary(sgd),
                       "steps_taken": len(sgd), "steps_read": len(reads),
                       "machine": bt.machine(), "load": bt.load()})
        for eng in stores.values():
            eng.close(save=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    bt.finish(result, args.out)


if __name__ == "__main__":
    main()

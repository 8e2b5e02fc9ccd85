"""Where one `recommend` spends its time, stage by stage, against the floor of the FAISS search alone.

    python benchmarks/stages.py [--items 100000] [--queries 1000] [--threads 1,2] [--out FILE]

A store of N clustered synthetic items (benchmarks/bench_data.py; HNSW above 50k, as `auto`
picks) with 256 users of 20 clicks each, fsync on. Then, in one run:

- `recommend(user, k=10)` one call at a time, with each stage's own time (its time less the
  stages inside it) taken by timing wrappers on the engine's methods: search (the FAISS call),
  candidates (co-clicks, the popular list and the merge around the search), features, reranker
  (or the untrained blend), exploration, ids (rows to Recommendations), and "engine" (the rest:
  locks, the user, the banned and allowed rows, the top-k sort);
- the floor: the same users' FAISS search alone (`VectorIndex.search` of the query the engine
  builds, `retrieve` rows, the seen rows excluded), with no wrappers installed;
- `record(click)`: the time until it returns, when the user's vector, history and the item's
  counts have changed (checked after every call), and that plus the next `recommend`; in the
  same loop a 200-byte append and fsync, also after a `recommend` (the floor in the same
  conditions: on this host a core that ran a request, or slept, runs the next short call 2-3x
  slower than one that ran it back to back), and `record` back to back with nothing between;
- recommend throughput with 1 and 2 threads (calls per second, no wrappers).

With `--busy N` every phase is measured twice: as above, then again with N other processes each
spinning a core (bench_timing.busy_host), the "busy host" of the targets, made the same way on
every run.

Prints one JSON object (also written to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import LookupEncoder, catalog_vectors, synthetic, synthetic_items, user_clicks  # noqa: E402
from bench_timing import busy_host, finish, method_timer, summary, throughput  # noqa: E402

from engine import Config, Engine, Event  # noqa: E402
from engine.runtime import queries as queries_mod  # noqa: E402
from engine.serving.index import VectorIndex  # noqa: E402
from engine.serving.features import Features  # noqa: E402
from engine.serving.ranking import Ranker  # noqa: E402

USERS, CLICKS = 256, 20


def build(path: Path, n: int) -> tuple[Engine, list[str], dict]:
    """The store: `ingest` of the catalog (one snapshot, no log record per item: a 1M catalog
    would log 2 GB of vectors through add_items), then the users' clicks. Returns the engine,
    the users and the build's timings (ingest wall seconds, of which the index build)."""
    vectors, _ = synthetic(catalog_vectors(), n, seed=0)
    items = synthetic_items(n)
    eng = Engine.create(path, config=Config(seed=0), encoder=LookupEncoder(vectors))
    with method_timer(VectorIndex, "build") as builds:
        t = time.perf_counter()
        eng.ingest(items, progress=False)
        ingest_s = time.perf_counter() - t
    users = [f"u{i}" for i in range(USERS)]
    eng.import_events([Event(u, items[int(r)].item_id, "click", 1.0, 1_700_000_000 + j)
                       for u, rows in zip(users, user_clicks(vectors, USERS, CLICKS, seed=1))
                       for j, r in enumerate(rows)])
    return eng, users, {"ingest_s": round(ingest_s, 2), "index_build_s": round(sum(builds), 2)}


class Stages:
    """Timing wrappers with exclusive times: a stage's time excludes the stages called inside it."""

    WRAP = [  # (owner, attribute, stage)
        (VectorIndex, "_search", "search"),
        (Ranker, "candidates", "candidates"),
        (Features, "raw", "features"),
        (Ranker, "score", "reranker"),
        (Ranker, "explore_bonus", "exploration"),
        (queries_mod, "as_recommendations", "ids"),
    ]

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[float]] = []
        self._saved: list[tuple[object, str, object]] = []

    def install(self) -> None:
        for owner, name, stage in self.WRAP:
            fn = getattr(owner, name)
            self._saved.append((owner, name, fn))
            setattr(owner, name, self._wrap(fn, stage, bound=isinstance(owner, type)))

    def uninstall(self) -> None:
        for owner, name, fn in reversed(self._saved):
            setattr(owner, name, fn)
        self._saved.clear()

    def _wrap(self, fn, stage: str, bound: bool):
        def timed(*args, **kwargs):
            self._stack.append([0.0])  # time of the stages inside this one
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent = time.perf_counter() - t
                inner = self._stack.pop()[0]
                self.totals[stage] += spent - inner
                if self._stack:
                    self._stack[-1][0] += spent
        return timed


def stage_breakdown(eng: Engine, users: list[str], queries: int) -> dict:
    stages = Stages()
    stages.install()
    try:
        pick = [users[i % len(users)] for i in range(queries)]
        for u in pick[:20]:
            eng.recommend(u, k=10)
        stages.totals.clear()
        lat = []
        for u in pick:
            t = time.perf_counter()
            eng.recommend(u, k=10)
            lat.append(time.perf_counter() - t)
    finally:
        stages.uninstall()
    total = sum(lat)
    share = {k: v / total for k, v in stages.totals.items()}
    share["engine"] = 1.0 - sum(share.values())
    return {"recommend_with_wrappers": summary(lat),
            "share": {k: round(v, 4) for k, v in sorted(share.items(), key=lambda kv: -kv[1])},
            "mean_ms": {k: round(v * total / len(lat) * 1e3, 4) for k, v in share.items()}}


def floor(eng: Engine, users: list[str], queries: int) -> dict:
    """The FAISS search alone, with the query and the exclusions `recommend` would use."""
    st = eng._core.state
    pick = [users[i % len(users)] for i in range(queries)]
    qs = []
    for u in pick:
        user = st.users.get(u)
        seen = np.fromiter(user.seen(), np.int64)
        qs.append((st.ranker.space.query(user.vector, user.count), seen))
    retrieve = eng.config.retrieve
    for q, seen in qs[:20]:
        st.index.search(q, retrieve, exclude=seen)
    lat = []
    for q, seen in qs:
        t = time.perf_counter()
        st.index.search(q, retrieve, exclude=seen)
        lat.append(time.perf_counter() - t)
    recs = []
    for u in pick:
        t = time.perf_counter()
        eng.recommend(u, k=10)
        recs.append(time.perf_counter() - t)
    return {"search_alone": summary(lat), "recommend": summary(recs)}


def feedback(eng: Engine, n_items: int, count: int) -> dict:
    """record(click) by a new user each time: until it returns (the effect is in the state, checked),
    and until the next recommend has answered. Beside it, in the same loop and so after the same
    kind of request: a 200-byte append and fsync on the store's disk followed by a recommend (the
    floor under `record` in those conditions). Then `record` back to back with nothing between."""
    st = eng._core.state
    rng = np.random.default_rng(7)
    rows = rng.choice(n_items, 2 * count + 40, replace=False)
    rec, to_list, probe = [], [], []
    first = sum(1 for _ in st.users.vocab.ids() if _.startswith("f"))  # new users on every call
    fd, probe_path = _probe(Path(eng.path))
    try:
        for j, r in enumerate(rows[: count + 20]):
            user, item = f"f{first + j}", f"s{r}"
            row = st.items.vocab.row(item)
            clicks_before = float(st.items.clicks[row])
            t = time.perf_counter()
            eng.record(user, item, "click")
            t_rec = time.perf_counter()
            eng.recommend(user, k=10)
            t_end = time.perf_counter()
            u = st.users.get(user)
            assert u is not None and u.clicks[-1] == row and st.items.clicks[row] == clicks_before + 1
            assert float(np.abs(u.vector).sum()) > 0
            t_probe = time.perf_counter()
            os.write(fd, b"x" * 200)
            os.fsync(fd)
            probe_s = time.perf_counter() - t_probe
            eng.recommend(user, k=10)
            if j >= 20:
                rec.append(t_rec - t)
                to_list.append(t_end - t)
                probe.append(probe_s)
    finally:
        os.close(fd)
        probe_path.unlink()
    hot = []
    for j, r in enumerate(rows[count + 20:]):
        t = time.perf_counter()
        eng.record(f"g{first + j}", f"s{r}", "click")
        if j >= 20:
            hot.append(time.perf_counter() - t)
    return {"record": summary(rec), "record_then_recommend": summary(to_list), "fsync": eng.config.fsync,
            "append_and_fsync_in_the_loop": summary(probe),
            "record_back_to_back": summary(hot),
            "append_and_fsync_alone": fsync_floor(Path(eng.path), count)}


def _probe(folder: Path) -> tuple[int, Path]:
    path = folder / "fsync-probe.tmp"
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), path


def fsync_floor(folder: Path, count: int) -> dict:
    """A 200-byte append and its fsync on the store's own disk, alone: the floor under `record`."""
    lat = []
    fd, path = _probe(folder)
    try:
        for _ in range(count):
            t = time.perf_counter()
            os.write(fd, b"x" * 200)
            os.fsync(fd)
            lat.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        path.unlink()
    return summary(lat)


def measure(eng: Engine, users: list[str], args: argparse.Namespace) -> dict:
    res = {"load_before": [round(x, 2) for x in os.getloadavg()],
           "floor": floor(eng, users, args.queries),
           "stages": stage_breakdown(eng, users, args.queries),
           "feedback": feedback(eng, args.items, min(args.queries, 500))}
    pick = [users[i % len(users)] for i in range(args.queries)]
    res["throughput"] = {f"{t} threads": round(throughput(lambda u: eng.recommend(u, k=10), pick, threads=t), 1)
                         for t in (int(x) for x in args.threads.split(","))}
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--fit", action="store_true", help="also measure after fit() on the users' clicks")
    p.add_argument("--busy", type=int, default=0, help="also measure with N processes spinning a core each")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    out: dict = {"items": args.items, "cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()]}
    with tempfile.TemporaryDirectory(prefix="kindling-stages-") as tmp:
        eng, users, out["build"] = build(Path(tmp) / "store", args.items)
        out["index"] = eng.stats().get("index")
        print(json.dumps({"build": out["build"], "index": out["index"]}), flush=True)
        phases = [("untrained", None)]
        if args.fit:
            phases.append(("after fit", True))
        for name, fit in phases:
            if fit:
                events = [Event(u, h, "click") for u in users for h in eng.user_history(u)]
                eng.fit(events, progress=False)
            for busy in sorted({0, args.busy}):
                with busy_host(busy):
                    res = measure(eng, users, args)
                key = name if not busy else f"{name}, busy {busy}"
                out[key] = res
                print(json.dumps({key: res}), flush=True)
        eng.close(save=False)
    finish(out, args.out)


if __name__ == "__main__":
    main()

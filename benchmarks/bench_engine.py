"""One catalog size: engines of several index kinds over the same items, measured side by side.

Everything goes through the public API (Engine.create / ingest / record / recommend / add_items /
remove_items). Two readings reach inside, read-only, and say so: the raw ANN recall searches each
engine's VectorIndex with the user's own query vector (reranking reorders, so recall is measured
before it), and the index build time wraps VectorIndex.build while ingest runs.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import bench_data as data
import bench_timing as bt
from engine import Config, Engine, Item
from engine.serving.index import VectorIndex


@dataclass
class Setup:
    n: int
    vectors: np.ndarray
    clicks: list[np.ndarray]           # per benchmark user, the item rows clicked
    queries: int                       # timed recommend calls per engine
    warmup: int
    root: Path
    fallback: Any                      # the real encoder for one-item adds
    log: Any = print
    engines: dict[str, Engine] = field(default_factory=dict)


def build(setup: Setup, name: str, config: Config) -> dict[str, Any]:
    """Create a store of `config`, ingest the catalog, replay the users' clicks; time and weigh it."""
    rss0 = bt.rss_bytes()
    enc = data.LookupEncoder(setup.vectors, fallback=setup.fallback)
    with bt.method_timer(VectorIndex, "build") as builds:
        t = time.perf_counter()
        eng = Engine.create(setup.root / name, config, encoder=enc)
        eng.ingest(data.synthetic_items(setup.n), progress=False)
        ingest_s = time.perf_counter() - t
    rss1 = bt.rss_bytes()
    for u, rows in enumerate(setup.clicks):
        for r in rows:
            eng.record(f"u{u}", f"s{r}", "click")
    setup.engines[name] = eng
    index_file = max(eng.path.glob("index-*.faiss"), key=lambda p: p.stat().st_mtime)
    out = {"kind": eng.stats()["index"]["kind"], "fsync": config.fsync, "build_s": round(sum(builds), 2),
           "ingest_s": round(ingest_s, 2), "index_bytes_per_item": round(index_file.stat().st_size / setup.n, 1),
           "rss_bytes_per_item": round((rss1 - rss0) / setup.n, 1), "load": bt.load()}
    setup.log(f"  {name}: {out}")
    return out


def user_ids(setup: Setup, count: int) -> list[str]:
    return [f"u{i % len(setup.clicks)}" for i in range(count)]


def latency(setup: Setup, names: list[str], modes: dict[str, int | None], chunk: int = 25
            ) -> dict[str, dict[str, Any]]:
    """recommend(k=10) per engine and thread mode on the same users, interleaved in chunks so that
    a change of load on a shared host hits every engine and mode alike. Keys: mode -> engine."""
    users = user_ids(setup, setup.queries + setup.warmup)
    spent = {(m, n): [] for m in modes for n in names}
    for name in names:  # warm-up, dropped
        for u in users[:setup.warmup]:
            setup.engines[name].recommend(u, 10)
    timed = users[setup.warmup:]
    for s in range(0, len(timed), chunk):
        for (mode, name), acc in spent.items():
            with bt.request_threads(modes[mode]):
                acc += bt.time_each(lambda u, e=setup.engines[name]: e.recommend(u, 10), timed[s:s + chunk], 0)
    out: dict[str, dict[str, Any]] = {m: {} for m in modes}
    for (mode, name), acc in spent.items():
        eng = setup.engines[name]
        qps = bt.throughput(lambda u, e=eng: e.recommend(u, 10), timed[: max(len(timed) // 2, 20)], threads=2,
                            per_request=modes[mode])
        out[mode][name] = {"recommend": bt.summary(acc), "qps_2_threads": round(qps, 1)}
    return out


def _query(eng: Engine, user_id: str) -> tuple[np.ndarray, np.ndarray]:
    """The user's query vector and seen rows, exactly as recommend() builds them (read-only)."""
    user = eng._core.state.users.get(user_id)
    seen = np.fromiter(user.seen(), np.int64, len(user.seen()))
    return eng._core.state.ranker.space.query(user.vector), seen


def recall(setup: Setup, exact: str, names: list[str], n_queries: int = 200) -> dict[str, dict[str, Any]]:
    """Raw index recall@10 vs the exact index on the same query vectors and exclusions; plus the recall
    of the true top 10 within the `retrieve` (200) candidates that the engine re-scores exactly."""
    users = user_ids(setup, min(n_queries, len(setup.clicks)))
    with bt.request_threads(1):  # index search times: one thread, see latency() for both modes
        return _recall(setup, exact, names, users)


def _recall(setup: Setup, exact: str, names: list[str], users: list[str]) -> dict[str, dict[str, Any]]:
    qs = [_query(setup.engines[exact], u) for u in users]
    truth = [setup.engines[exact]._core.state.index.search(q, 10, exclude=seen)[0] for q, seen in qs]
    out = {}
    for name in names:
        index, retrieve = setup.engines[name]._core.state.index, setup.engines[name].config.retrieve
        at10, in_cand, t_ann = [], [], []
        for (q, seen), gt in zip(qs, truth):
            t = time.perf_counter()
            top = index.search(q, 10, exclude=seen)[0]
            t_ann.append(time.perf_counter() - t)
            cand = index.search(q, retrieve, exclude=seen)[0]
            at10.append(len(np.intersect1d(top, gt)) / len(gt))
            in_cand.append(len(np.intersect1d(cand, gt)) / len(gt))
        out[name] = {"recall_at_10": round(float(np.mean(at10)), 4),
                     "recall_at_10_in_candidates": round(float(np.mean(in_cand)), 4),
                     "index_search": bt.summary(t_ann[10:])}
    return out


def feedback_to_effect(setup: Setup, name: str, count: int, threads: int | None = None) -> dict[str, Any]:
    """record(click) by a new user, then recommend(): time from the call to record() to the list.

    The list reflects the click when it leaves the clicked item out and sits closer to it than the
    list the same user got just before the click (the popular items)."""
    eng = setup.engines[name]
    rng = np.random.default_rng(7)
    rows = rng.choice(setup.n, count + setup.warmup, replace=False)
    spent, rec_only, hits = [], [], 0
    tag = f"f{time.perf_counter_ns()}-"  # new users every call
    for j, r in enumerate(rows):
        before = eng.recommend(f"{tag}{j}", 10)
        with bt.request_threads(threads):
            t = time.perf_counter()
            eng.record(f"{tag}{j}", f"s{r}", "click")
            t_rec = time.perf_counter()
            recs = eng.recommend(f"{tag}{j}", 10)
            t_end = time.perf_counter()
        if j < setup.warmup:
            continue
        spent.append(t_end - t)
        rec_only.append(t_rec - t)
        hits += _reflects(setup.vectors, r, before, recs)
    return {**bt.summary(spent), "record": bt.summary(rec_only), "reflected": round(hits / len(spent), 3),
            "fsync": eng.config.fsync}


def _reflects(vectors: np.ndarray, row: int, before, after) -> bool:
    def closeness(recs) -> float:
        got = [int(x.item_id[1:]) for x in recs if x.item_id[1:].isdigit() and x.item_id.startswith("s")]
        return float((vectors[got] @ vectors[row]).mean()) if got else -1.0

    ids = {x.item_id for x in after}
    return f"s{row}" not in ids and closeness(after) > closeness(before)


def one_item_add(setup: Setup, name: str, catalog: list[Item], count: int, tag: str,
                 threads: int | None = None, warmup: int = 3) -> dict[str, Any]:
    """add_items([one real item]): the real encoder embeds it, the log takes it, the index adds it."""
    eng = setup.engines[name]
    items = [Item(f"{tag}{j}", f"{it.title} [{tag} {j}]", it.text, it.categories)
             for j, it in enumerate(catalog[: count + warmup])]
    with bt.request_threads(threads):
        spent = bt.time_each(lambda it: eng.add_items([it]), items, warmup)
    return bt.summary(spent)


def removal(setup: Setup, name: str, count: int) -> dict[str, Any]:
    eng = setup.engines[name]
    clicked = set(np.concatenate(setup.clicks).tolist())
    rng = np.random.default_rng(11)
    rows = [r for r in rng.choice(setup.n, 3 * count, replace=False) if r not in clicked][:count]
    return bt.summary(bt.time_each(lambda r: eng.remove_items([f"s{r}"]), rows, 3))


def close_all(setup: Setup) -> None:
    for eng in setup.engines.values():
        eng.close(save=False)
    setup.engines.clear()


def new_setup(n: int, centres: np.ndarray, queries: int, fallback, log, users: int = 256) -> Setup:
    vectors, _ = data.synthetic(centres, n, seed=n)
    root = Path(tempfile.mkdtemp(prefix=f"kindling-bench-{n}-"))
    clicks = data.user_clicks(vectors, users, 3, seed=n + 1)
    return Setup(n, vectors, clicks, queries, warmup=20, root=root, fallback=fallback, log=log)

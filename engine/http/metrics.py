"""GET /metrics in the Prometheus text format, written by hand (no client library needed).

`Metrics` keeps a latency histogram per route and method (the route's template, e.g.
`/items/{item_id}/similar`, so ids never become labels), a counter per status code, a counter of
the requests shed (middleware.py) and the gauge of requests in flight.
The store's own figures (events, items, model generation) are read from `Engine.stats()` when
/metrics is asked for. With `kindling serve --workers`, `label_workers` joins every worker's text
into one, each sample labelled with its `worker` (forward.py gathers them), and `worker_gauges`
adds each worker's state.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

#: Upper bounds of the latency buckets, in seconds.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """Request counts and latencies, safe from any thread.

    `in_flight` (requests admitted and not yet answered, /healthz and /metrics aside) and
    `in_flight_limit` (0: no limit) are plain integers that only the ASGI middleware changes, on
    the event loop; a render from another thread reads whole values.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hist: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * (len(BUCKETS) + 2))
        self._status: dict[tuple[str, str, int], int] = defaultdict(int)
        self._shed: dict[tuple[str, str], int] = defaultdict(int)
        self.in_flight = 0
        self.in_flight_limit = 0

    def observe(self, method: str, route: str, status: int, seconds: float) -> None:
        with self._lock:
            h = self._hist[(method, route)]
            h[bisect.bisect_left(BUCKETS, seconds)] += 1  # the last bucket slot is +Inf only
            h[-1] += seconds
            self._status[(method, route, status)] += 1

    def shed(self, method: str, route: str) -> None:
        """Count a request answered with 503 because `in_flight_limit` requests were in flight."""
        with self._lock:
            self._shed[(method, route)] += 1

    def render(self, stats: dict[str, Any]) -> str:
        """The exposition text: the request metrics, then the store's gauges from `stats`."""
        out = ["# HELP kindling_request_duration_seconds Time to answer a request, by route.",
               "# TYPE kindling_request_duration_seconds histogram"]
        with self._lock:
            for (method, route), h in sorted(self._hist.items()):
                labels = f'method="{method}",route="{_escape(route)}"'
                total = 0
                for bound, n in zip((*BUCKETS, "+Inf"), h[:-1]):
                    total += int(n)
                    out.append(f'kindling_request_duration_seconds_bucket{{{labels},le="{bound}"}} {total}')
                out.append(f"kindling_request_duration_seconds_sum{{{labels}}} {h[-1]:.6f}")
                out.append(f"kindling_request_duration_seconds_count{{{labels}}} {total}")
            out += ["# HELP kindling_requests_total Requests answered, by route and status code.",
                    "# TYPE kindling_requests_total counter"]
            for (method, route, status), n in sorted(self._status.items()):
                out.append(f'kindling_requests_total{{method="{method}",route="{_escape(route)}",'
                           f'status="{status}"}} {n}')
            out += ["# HELP kindling_requests_shed_total Requests answered 503 at once because the server "
                    "had --max-queue requests in flight, by route.",
                    "# TYPE kindling_requests_shed_total counter"]
            for (method, route), n in sorted(self._shed.items()):
                out.append(f'kindling_requests_shed_total{{method="{method}",route="{_escape(route)}"}} {n}')
        gauges = (("requests_in_flight", "Requests admitted and not yet answered (running or waiting), "
                   "/healthz and /metrics aside.", self.in_flight),
                  ("requests_in_flight_limit", "Requests admitted at once before the next is shed "
                   "(kindling serve --max-queue; 0: no limit).", self.in_flight_limit),
                  ("events", "Events the store holds (recorded and imported).", stats["events"]),
                  ("live_items", "Items that can be recommended.", stats["live_items"]),
                  ("users", "Users the store holds.", stats["users"]),
                  ("generation", "The snapshot generation (a save or fit makes a new one).", stats["generation"]),
                  ("pending_log_records", "Log records since the last snapshot.", stats["pending_log_records"]),
                  ("trained", "1 once fit has trained the models, else 0.", int(bool(stats["trained"]))),
                  ("online_steps_pending", "Clicks waiting for the reranker's online step.",
                   stats["online_steps"]["pending"]))
        if "lag_ms_p99" in stats["online_steps"]:
            gauges += (("online_step_lag_p99_seconds", "p99 of the time from a click to its online step "
                        "(the last 1,024 steps).", stats["online_steps"]["lag_ms_p99"] / 1e3),)
        lag = stats.get("replica")
        if lag:  # a following replica (kindling serve --replica)
            gauges += (("replica_behind_seconds", "Seconds since the replica last had every logged record.",
                        lag["behind_s"]),
                       ("replica_applied_seq", "Sequence number of the last log record the replica applied.",
                        lag["applied_seq"]))
        for name, help_, value in gauges:
            out += [f"# HELP kindling_{name} {help_}", f"# TYPE kindling_{name} gauge", f"kindling_{name} {value}"]
        return "\n".join(out) + "\n"


def label_workers(texts: Sequence[tuple[str, str]]) -> list[str]:
    """Several processes' exposition texts as one: every sample gains a `worker` label.

    Args:
        texts: (worker label, that worker's /metrics text), in the order to show them.
    Returns:
        The lines: each metric family once (its HELP and TYPE as the first worker wrote them,
        then every worker's samples), families in the order first seen.
    """
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, text in texts:
        family = ""
        for line in text.splitlines():
            if line.startswith("# "):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    head = heads.setdefault(family, [])
                    if not any(h.split(" ", 2)[1] == parts[1] for h in head):
                        head.append(line)
                continue
            if not line.strip():
                continue
            name = line.split("{", 1)[0].split(" ", 1)[0]
            owner = family if family and name.startswith(family) else name  # _bucket, _sum, _count
            heads.setdefault(owner, [])
            samples.setdefault(owner, []).append(with_label(line, "worker", worker))
    return [line for family, head in heads.items() for line in (*head, *samples.get(family, ()))]


def with_label(sample: str, key: str, value: str) -> str:
    """`sample` (one exposition line: name, optional labels, value) with `key="value"` added."""
    brace, space = sample.find("{"), sample.find(" ")
    label = f'{key}="{_escape(value)}"'
    if brace != -1 and (space == -1 or brace < space):
        end = sample.rfind("}")  # the value after it is a number: the last brace closes the labels
        return f"{sample[:end]}{',' if sample[end - 1] != '{' else ''}{label}{sample[end:]}"
    return f"{sample[:space]}{{{label}}}{sample[space:]}"


def worker_gauges(workers: Sequence[dict[str, Any]]) -> list[str]:
    """The gauges of `kindling serve --workers`: which workers answered, their restarts, their
    log positions and how many records each replica is behind the writer.

    Args:
        workers: one dict per worker, by index: `worker`, `role`, `up` and, when up,
            `restarts` and `log_position` (Engine.log_position).
    """
    up = [w for w in workers if w["up"]]
    writer = next((w for w in up if w["role"] == "writer"), None)
    families = (
        ("worker_up", "1 when the worker answered this scrape (kindling serve --workers), else 0.",
         [(w, int(w["up"])) for w in workers]),
        ("worker_restarts", "Times the supervisor restarted this worker after it died.",
         [(w, w["restarts"]) for w in up]),
        ("log_position", "The next log sequence number: the writer logged, a replica applied, every record "
         "below it.", [(w, w["log_position"]) for w in up]),
        ("replica_behind_records", "Log records the writer holds that this replica has not applied yet.",
         [(w, max(0, writer["log_position"] - w["log_position"])) for w in up if w["role"] == "replica"]
         if writer else []))
    out = []
    for name, help_, values in families:
        out += [f"# HELP kindling_{name} {help_}", f"# TYPE kindling_{name} gauge"]
        out += [f'kindling_{name}{{worker="{w["worker"]}",role="{w["role"]}"}} {v}' for w, v in values]
    return out


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


__all__ = ["BUCKETS", "Metrics", "label_workers", "with_label", "worker_gauges"]

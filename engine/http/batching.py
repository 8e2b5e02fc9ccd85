"""Micro-batching of POST /recommend: concurrent calls answered by one `Engine.recommend_many`.

A /recommend for a stored or new user (no `profile`, no `exclude`) joins the group of calls with
the same options (k, rules, diversity, explain) that arrived within `window_s` of the group's
first call; the group is answered by one `recommend_many` on the thread pool when the window
closes or it holds `max_batch` calls. One batched call takes the read lock once and searches
FAISS once for the whole group (in-process at 100k items after `fit`, 8 users in one call: 1.15x
the calls per second of 8 single calls; over HTTP 1.24-1.44x, benchmarks/README.md), and on an exact index each list is
the one `recommend` gives (`Engine.recommend_many`); the HTTP test holds them equal.

A call that cannot join (a profile is a write; `exclude` differs per call) goes alone, as does
every call when `window_s` is 0. A user id that breaks a rule is refused before it joins a group,
so an error a batched call raises (the options, or the store) is every one of its calls' error.

Everything here runs on the event loop (one thread): the pending groups need no lock.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from starlette.concurrency import run_in_threadpool

from ..engine import Engine
from ..serving.filters import Filter
from ..types import check_id
from ..types import Recommendation

#: Seconds a group waits for more calls after its first (0 turns batching off). From
#: benchmarks/batching.py (8 clients, after fit, two rounds): 100k items, 0 / 1 / 2 ms gave 383-452 /
#: 550-560 / 502-547 requests a second, p99 42-43 / 28-29 / 28-37 ms; the bundled catalog 502-542 /
#: 562 / 545-576, p99 28-32 / 27-31 / 20-24 ms. 1 ms: the most throughput at 100k, at most 1 ms
#: added to a call that comes alone.
BATCH_WINDOW_S = 0.001
#: The most calls in one group: a full group goes at once.
MAX_BATCH = 32


@dataclass(frozen=True)
class Options:
    """What a group's calls share: the arguments of `recommend_many` other than the users."""

    k: int
    filter: Filter | None  # hashable: a Filter holds tuples
    diversity: float
    explain: bool


@dataclass
class _Group:
    options: Options
    calls: list[tuple[str, asyncio.Future]] = field(default_factory=list)


class RecommendBatcher:
    """Groups concurrent `recommend` calls into `Engine.recommend_many` (see the module docstring).

    Args:
        engine: the open Engine.
        window_s: how long a group waits for more calls after its first (seconds, >= 0; 0: off).
        max_batch: the most calls in one group (>= 1).
    """

    def __init__(self, engine: Engine, window_s: float = BATCH_WINDOW_S, max_batch: int = MAX_BATCH) -> None:
        if isinstance(window_s, bool) or not isinstance(window_s, (int, float)) or not 0 <= window_s <= 1:
            raise ValueError(f"the batch window must be between 0 and 1 second; got {window_s!r}")
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive integer; got {max_batch!r}")
        self.engine, self.window_s, self.max_batch = engine, float(window_s), max_batch
        self._open: dict[Options, _Group] = {}
        self._answering: set[asyncio.Task] = set()  # the loop keeps only weak references to tasks
        #: Calls answered and batched calls made (one per group answered together), for /metrics.
        self.calls = 0
        self.batches = 0

    async def recommend(self, user_id: str, options: Options) -> list[Recommendation]:
        """What `engine.recommend(user_id, k, filter=..., diversity=..., explain=...)` returns."""
        check_id(user_id, "user_id")  # refused alone: a bad id in a group would fail the whole group
        if self.window_s == 0:
            recs = await run_in_threadpool(self._one, user_id, options)
            self.calls += 1
            return recs
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        group = self._open.get(options)
        if group is None:
            group = self._open[options] = _Group(options)
            loop.call_later(self.window_s, self._close, group)
        group.calls.append((user_id, done))
        if len(group.calls) >= self.max_batch:
            self._close(group)
        recs = await done
        self.calls += 1
        return recs

    def _close(self, group: _Group) -> None:
        """Stop `group` taking calls and answer it (a no-op when it was closed already)."""
        if self._open.get(group.options) is not group:
            return
        del self._open[group.options]
        task = asyncio.get_running_loop().create_task(self._answer(group))
        self._answering.add(task)
        task.add_done_callback(self._answering.discard)

    async def _answer(self, group: _Group) -> None:
        try:
            lists = await run_in_threadpool(self._many, [user_id for user_id, _ in group.calls], group.options)
        except Exception as exc:  # noqa: BLE001 - the options or the store, the same for every call
            for _, done in group.calls:
                if not done.cancelled():
                    done.set_exception(exc)
            return
        self.batches += 1
        for (_, done), recs in zip(group.calls, lists):
            if not done.cancelled():  # the client went away
                done.set_result(recs)

    def render(self) -> str:
        """The batcher's counters in the Prometheus text format (appended to /metrics)."""
        return ("# HELP kindling_recommend_calls_total /recommend calls answered through the batcher.\n"
                "# TYPE kindling_recommend_calls_total counter\n"
                f"kindling_recommend_calls_total {self.calls}\n"
                "# HELP kindling_recommend_batches_total Batched recommend_many calls that answered them "
                "(calls / batches: the mean batch).\n"
                "# TYPE kindling_recommend_batches_total counter\n"
                f"kindling_recommend_batches_total {self.batches}\n")

    def _many(self, user_ids: list[str], o: Options) -> list[list[Recommendation]]:
        return self.engine.recommend_many(user_ids, k=o.k, filter=o.filter, diversity=o.diversity,
                                          explain=o.explain)

    def _one(self, user_id: str, o: Options) -> list[Recommendation]:
        return self.engine.recommend(user_id, k=o.k, filter=o.filter, diversity=o.diversity, explain=o.explain)


__all__ = ["BATCH_WINDOW_S", "MAX_BATCH", "Options", "RecommendBatcher"]

"""The one ASGI layer around the routes: load shedding, the request body size limit and the
latency metrics.

Load shedding: at most `max_queue` requests are admitted at once, counting those running on the
thread pool and those waiting for a thread or for the store's lock. The next one is answered at
once with 503 and `Retry-After`, before its body is read, so that an overload costs a refusal
instead of a queue that only grows (and a tail latency that grows with it). The count is a plain
integer: every ASGI call, and so every change to it, runs on the one event loop.
"""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException
from starlette.routing import Match

from .metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Requests admitted at once by default (in flight plus waiting), from benchmarks/shed.py (bundled
#: catalog, two shared cores, capacity 460-580 /recommend a second): at 16 the admitted p99 stayed at
#: 66-130 ms with 1x and 2x the capacity offered, against 160-456 ms at 32, 2.1 s at 64 (past AnyIO's
#: 40 worker threads, requests also queue for a thread) and seconds, growing, with no limit; 8 gave
#: 35-71 ms but shed more at 1x. Below the 40 threads, /healthz and /metrics always find one.
MAX_QUEUE = 16
#: The `Retry-After` of a shed request, in seconds: a full queue drains in well under this (~30 ms).
RETRY_AFTER_S = 1
#: Never shed: a load balancer's health check and the scrape that shows the overload.
UNSHED = frozenset({"/healthz", "/metrics"})


class BodyTooLarge(HTTPException):
    """Raised while a body streams in past the limit; an HTTPException, so that FastAPI's body
    reader passes it on to the handlers (errors.py) instead of calling it a parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit))


def too_large(limit: int) -> str:
    return f"request body must be at most {limit:,} bytes"


def shed_message(limit: int) -> str:
    return (f"the server is at its limit of {limit} requests at once (kindling serve --max-queue); "
            f"retry after {RETRY_AFTER_S} s")


class ServiceMiddleware:
    """Shed a request beyond `max_queue` admitted at once with 503 (0: no limit; /healthz and
    /metrics are never shed), refuse a body over `max_body` bytes with 413 (by its
    Content-Length, or while it streams in), and time every request into `metrics` under the
    route that answered it (or would have: a refused request is matched to its route here)."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics, max_body: int,
                 max_queue: int = MAX_QUEUE) -> None:
        self.app, self.metrics, self.max_body, self.max_queue = app, metrics, max_body, max_queue
        self.shed_body = json.dumps({"detail": shed_message(max_queue)}).encode()  # made once: shedding is cheap
        metrics.in_flight_limit = max_queue

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        counted = scope["path"] not in UNSHED
        shed = counted and 0 < self.max_queue <= self.metrics.in_flight
        holds = counted and not shed  # a place in the queue, given back when the answer is sent
        if holds:
            self.metrics.in_flight += 1
        try:
            if shed:
                await self._shed(sending)
            elif self._declared_length(scope) > self.max_body:
                await self._refuse(sending)
            else:
                await self.app(scope, self._limited(receive), sending)
        except BodyTooLarge:
            await self._refuse(sending)
        finally:
            if holds:
                self.metrics.in_flight -= 1
            route = route_of(scope)
            if shed:
                self.metrics.shed(scope["method"], route)
            self.metrics.observe(scope["method"], route, status["code"], time.perf_counter() - start)

    def _declared_length(self, scope: Scope) -> int:
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    return int(value)
                except ValueError:
                    return 0
        return 0

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def receiving() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise BodyTooLarge(self.max_body)
            return message
        return receiving

    async def _shed(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": 503,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self.shed_body)).encode()),
                                (b"retry-after", str(RETRY_AFTER_S).encode())]})
        await send({"type": "http.response.body", "body": self.shed_body})

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": too_large(self.max_body)}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def route_of(scope: Scope) -> str:
    """The template of the route that answered (`/items/{item_id:path}/similar`, never an id); for
    a request refused before routing, the first route its path and method match."""
    route = scope.get("route")
    if route is None and "app" in scope:  # Starlette puts itself in the scope before the middleware
        partial = None
        for candidate in scope["app"].routes:
            match, _ = candidate.matches(scope)
            if match is Match.FULL:
                route = candidate
                break
            if match is Match.PARTIAL and partial is None:
                partial = candidate
        route = route or partial
    return getattr(route, "path", None) or "(unmatched)"


__all__ = ["MAX_QUEUE", "RETRY_AFTER_S", "UNSHED", "ServiceMiddleware", "route_of", "shed_message"]

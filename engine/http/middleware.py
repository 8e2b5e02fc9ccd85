"""The one ASGI layer around the routes: the request body size limit and the latency metrics."""

from __future__ import annotations

import json
import time
from typing import Any, Awaitable, Callable

from starlette.exceptions import HTTPException

from .metrics import Metrics

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class BodyTooLarge(HTTPException):
    """Raised while a body streams in past the limit; an HTTPException, so that FastAPI's body
    reader passes it on to the handlers (errors.py) instead of calling it a parse error."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, too_large(limit))


def too_large(limit: int) -> str:
    return f"request body must be at most {limit:,} bytes"


class ServiceMiddleware:
    """Refuse a body over `max_body` bytes with 413 (by its Content-Length, or while it streams
    in), and time every request into `metrics` under the route that answered it."""

    def __init__(self, app: Callable[..., Awaitable[None]], metrics: Metrics, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

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

        try:
            if self._declared_length(scope) > self.max_body:
                await self._refuse(sending)
            else:
                await self.app(scope, self._limited(receive), sending)
        except BodyTooLarge:
            await self._refuse(sending)
        finally:
            route = getattr(scope.get("route"), "path", None) or "(unmatched)"
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

    async def _refuse(self, send: Send) -> None:
        body = json.dumps({"detail": too_large(self.max_body)}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


__all__ = ["ServiceMiddleware"]

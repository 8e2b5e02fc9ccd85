"""What makes the processes of `kindling serve --workers N` one service: the ASGI layer each
worker puts around its app (`create_app(worker=WorkerLink(...))`; workers.py starts them).

- Every response names the worker that answered: `X-Kindling-Worker: 0` is the writer, 1..N-1
  the read replicas. The writer's answer to a POST or DELETE also carries `X-Kindling-Log-Seq`:
  its log position once the request was done (`Engine.log_position`).
- On a replica, a write (POST /events, POST /items, DELETE /items/..., a POST /recommend with a
  `profile`, which is saved) is forwarded to the writer over the writer's private unix socket, and
  the writer's status, headers and body are returned as they are: the API key, the body's rules
  and load shedding are the writer's. Before answering, the replica waits (at most `RYW_WAIT_S`)
  until it has applied the writer's log up to `X-Kindling-Log-Seq`, so a client's next read on
  the same connection shows its write. Any request carrying `X-Kindling-Min-Seq: N` waits the same
  way: a client that wrote through another connection can read its write anywhere.
- GET /metrics gathers every worker's own /metrics over the private sockets and answers them as
  one text, each sample labelled with its `worker`, plus each worker's state (metrics.py). The
  lag of a replica is computed when asked, so a stalled follower shows as one (see
  docs/architecture.md for why not prometheus-client's multiprocess mode).
- GET /_kindling/worker, with the supervisor's token, is what that gathering reads.

Everything here runs on the worker's event loop; a forwarded request never takes a thread.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import httpx

from ..engine import Engine
from .metrics import label_workers, worker_gauges

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: The writer's index among the workers.
WRITER = 0
WORKER_HEADER = b"x-kindling-worker"
LOG_SEQ_HEADER = b"x-kindling-log-seq"
MIN_SEQ_HEADER = b"x-kindling-min-seq"
TOKEN_HEADER = b"x-kindling-worker-token"
#: What one worker reports to the /metrics of another (with the token only).
INTERNAL_PATH = "/_kindling/worker"
#: The longest a replica waits to have applied a write it forwarded (or X-Kindling-Min-Seq).
RYW_WAIT_S = 1.0
#: The longest /metrics waits for another worker's report; one that does not answer shows as down.
SCRAPE_TIMEOUT_S = 2.0
#: A forwarded write may take long (the first text embedded loads the model in the writer).
FORWARD_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
#: Headers that belong to one connection, or that the server sets itself, never passed on.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                        b"transfer-encoding", b"upgrade", b"content-length", b"date", b"server"})
METRICS_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class WorkerLink:
    """What one worker knows of the others.

    Args:
        index: this worker's number (0: the writer).
        sockets: every worker's private unix socket, by index.
        token: the secret that lets one worker read another's report.
        restarts: how many times the supervisor restarted this worker.
    """

    index: int
    sockets: tuple[str, ...]
    token: str
    restarts: int = 0

    @property
    def role(self) -> str:
        return "writer" if self.index == WRITER else "replica"


def is_write(method: str, path: str) -> bool:
    """A route that writes whatever its body says (a /recommend writes only with a profile)."""
    return (method == "POST" and path in ("/events", "/items")) or (method == "DELETE" and path.startswith("/items/"))


def carries_profile(body: bytes) -> bool:
    """A /recommend body that sets `profile` (saved with the user: a write)."""
    if b"profile" not in body and b"\\u" not in body:
        return False
    try:
        data = json.loads(body)
    except ValueError:
        return False  # the route answers it with 400, as the writer would
    return isinstance(data, dict) and data.get("profile") is not None


class WorkerMiddleware:
    """The outermost layer of a worker's app: see the module docstring."""

    def __init__(self, app: Callable[..., Awaitable[None]], link: WorkerLink, engine: Engine,
                 max_body: int) -> None:
        self.app, self.link, self.engine, self.max_body = app, link, engine, max_body
        self.name = str(link.index).encode()
        self._clients: dict[int, httpx.AsyncClient] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method, path = scope["method"], scope["path"]
        if path == INTERNAL_PATH and self._trusted(scope):
            await _answer(send, 200, json.dumps(await self._report(scope)).encode(), b"application/json")
            return
        if path == "/metrics" and method == "GET":
            await _answer(send, 200, await self._metrics(scope), METRICS_TYPE, [(WORKER_HEADER, self.name)])
            return
        if self.link.index != WRITER:
            declared = _header(scope, b"content-length")
            too_large = declared is not None and declared.isdigit() and int(declared) > self.max_body
            if (is_write(method, path) or (method == "POST" and path == "/recommend")) and not too_large:
                body, complete = await self._read_body(receive)
                if complete and (path != "/recommend" or carries_profile(body)):
                    await self._forward(scope, body, send)
                    return
                receive = _replay(body, not complete, receive)
            wanted = _header(scope, MIN_SEQ_HEADER)
            if wanted is not None and wanted.isdigit():
                await self._caught_up(int(wanted))
        await self.app(scope, receive, self._stamped(send, method))

    # ---- headers ---------------------------------------------------------------------------
    def _stamped(self, send: Send, method: str) -> Send:
        position = self.link.index == WRITER and method != "GET"

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", ()), (WORKER_HEADER, self.name)]
                if position:  # read after the write: the route has returned
                    headers.append((LOG_SEQ_HEADER, str(self.engine.log_position()).encode()))
                message = {**message, "headers": headers}
            await send(message)
        return sending

    def _trusted(self, scope: Scope) -> bool:
        given = _header(scope, TOKEN_HEADER)
        return given is not None and hmac.compare_digest(given.encode(), self.link.token.encode())

    # ---- writes on a replica -----------------------------------------------------------------
    async def _read_body(self, receive: Receive) -> tuple[bytes, bool]:
        """The request body, and whether it is all there (False: past `max_body`, or the client left)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return b"".join(chunks), False
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return b"".join(chunks), False  # the app refuses it with 413 (middleware.py)
            if not message.get("more_body", False):
                return b"".join(chunks), True

    async def _forward(self, scope: Scope, body: bytes, send: Send) -> None:
        """Send the request to the writer; answer with its answer once this replica shows it."""
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in HOP_BY_HOP]
        headers.append((b"x-kindling-forwarded-by", self.name))
        raw = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            raw += b"?" + scope["query_string"]
        client = self._client(WRITER)
        request = client.build_request(scope["method"], httpx.URL("http://kindling-writer", raw_path=raw),
                                       headers=headers, content=body, timeout=FORWARD_TIMEOUT)
        try:
            response = await client.send(request, stream=True)
            try:
                content = b"".join([chunk async for chunk in response.aiter_raw()])
            finally:
                await response.aclose()
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout):
            await _answer(send, 503, _detail("the store's writer (worker 0) cannot be reached right now; retry"),
                          b"application/json", [(b"retry-after", b"1"), (WORKER_HEADER, self.name)])
            return
        except httpx.TransportError:
            await _answer(send, 502, _detail("the store's writer (worker 0) stopped before it answered: the "
                                             "write may or may not have been applied"),
                          b"application/json", [(WORKER_HEADER, self.name)])
            return
        seq = response.headers.get(LOG_SEQ_HEADER.decode())
        if seq is not None and seq.isdigit():
            await self._caught_up(int(seq))
        kept = [(k.lower(), v) for k, v in response.headers.raw if k.lower() not in HOP_BY_HOP]
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": [*kept, (b"content-length", str(len(content)).encode())]})
        await send({"type": "http.response.body", "body": content})

    async def _caught_up(self, seq: int) -> bool:
        """Wait until this worker holds every log record below `seq`, at most RYW_WAIT_S."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + RYW_WAIT_S
        while self.engine.log_position() < seq:
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.001)
        return True

    # ---- /metrics over every worker ----------------------------------------------------------
    async def _report(self, scope: Scope) -> dict[str, Any]:
        """This worker's own /metrics text and state."""
        text = await self._local_metrics(scope)
        return {"worker": self.link.index, "role": self.link.role, "up": True, "pid": os.getpid(),
                "restarts": self.link.restarts, "log_position": self.engine.log_position(),
                "metrics": text}

    async def _metrics(self, scope: Scope) -> bytes:
        async def report(i: int) -> dict[str, Any]:
            if i == self.link.index:
                return await self._report(scope)
            try:
                resp = await self._client(i).get(INTERNAL_PATH, headers={TOKEN_HEADER.decode(): self.link.token},
                                                 timeout=SCRAPE_TIMEOUT_S)
                if resp.status_code == 200:
                    return resp.json()
            except (httpx.HTTPError, ValueError):
                pass
            return {"worker": i, "role": "writer" if i == WRITER else "replica", "up": False}

        reports = await asyncio.gather(*(report(i) for i in range(len(self.link.sockets))))
        lines = label_workers([(str(r["worker"]), r["metrics"]) for r in reports if r["up"]])
        return ("\n".join(lines + worker_gauges(reports)) + "\n").encode()

    async def _local_metrics(self, scope: Scope) -> str:
        """This worker's own GET /metrics, asked of the app inside this layer."""
        sub = {**scope, "method": "GET", "path": "/metrics", "raw_path": b"/metrics", "query_string": b"",
               "headers": []}
        chunks: list[bytes] = []
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": b"", "more_body": False}

        async def collect(message: Message) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
        await self.app(sub, receive, collect)
        return b"".join(chunks).decode("utf-8")

    def _client(self, index: int) -> httpx.AsyncClient:
        """One pooled client per other worker, over its private socket (made on this loop)."""
        client = self._clients.get(index)
        if client is None:
            transport = httpx.AsyncHTTPTransport(uds=self.link.sockets[index])
            client = self._clients[index] = httpx.AsyncClient(transport=transport,
                                                              base_url="http://kindling-worker")
        return client


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """A receive that first gives back the body already read, then reads on."""
    first = [{"type": "http.request", "body": body, "more_body": more}]

    async def receiving() -> Message:
        return first.pop() if first else await receive()
    return receiving


def _detail(text: str) -> bytes:
    return json.dumps({"detail": text}).encode()


async def _answer(send: Send, status: int, body: bytes, content_type: bytes,
                  headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


__all__ = ["INTERNAL_PATH", "RYW_WAIT_S", "WRITER", "WorkerLink", "WorkerMiddleware", "carries_profile", "is_write"]

"""`create_app(engine)`: the FastAPI application over one open Engine.

Each route parses its body (schemas.py), calls one library method and returns its result as
JSON; the rules on values and every error's status code live in the library and in errors.py.
Routes are plain functions, so FastAPI runs them on its thread pool; the Engine is thread-safe
(readers share a lock, writers take it alone).

Example:
    >>> from engine import Engine                                    # doctest: +SKIP
    >>> app = create_app(Engine.open("my-store"), api_key="s3cret")
    >>> import uvicorn; uvicorn.run(app)
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool

from ..version import __version__
from ..engine import Engine
from ..types import Item
from . import errors
from .batching import BATCH_WINDOW_S, Options, RecommendBatcher
from .metrics import Metrics
from .middleware import MAX_QUEUE, ServiceMiddleware
from .schemas import BatchBody, EventBody, ItemsBody, RecommendBody, SimilarQuery

if TYPE_CHECKING:
    from .forward import WorkerLink

#: One page of plain HTML and JavaScript over this same API (GET /): no build step.
PLAYGROUND = Path(__file__).with_name("playground.html")
#: The largest request body accepted, in bytes (413 above it).
MAX_BODY_BYTES = 4 * 1024 * 1024
#: Where the JavaScript, CSS and icon of /docs and /redoc are served.
DOCS_ASSETS = "/docs-assets"


def create_app(engine: Engine, api_key: str | None = None, max_body: int = MAX_BODY_BYTES,
               close_on_shutdown: bool = False, max_queue: int = MAX_QUEUE,
               batch_window_s: float = BATCH_WINDOW_S, worker: WorkerLink | None = None) -> FastAPI:
    """The service over `engine`.

    Args:
        engine: an open Engine (writable, for the write routes to work).
        api_key: when given, every write (POST /events, POST /items, DELETE /items/..., and a
            /recommend that carries a profile, which is saved) needs `Authorization: Bearer
            <api_key>`; reads stay open.
        max_body: the largest request body, in bytes.
        close_on_shutdown: close the engine (saving a snapshot) when the server shuts down,
            after the requests in flight have been answered.
        max_queue: the most requests admitted at once, running or waiting (/healthz and /metrics
            aside); the next is answered 503 with `Retry-After` at once. 0: no limit.
        batch_window_s: concurrent /recommend calls that arrive within this many seconds of each
            other are answered by one `recommend_many` (batching.py); 0: each alone.
        worker: this process is one of `kindling serve --workers N` (forward.py): a replica
            forwards writes to the writer, /metrics covers every worker, answers name the worker.

    Raises:
        ValueError: max_queue is not an integer >= 0, or batch_window_s not in [0, 1].
    """
    if isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0:
        raise ValueError(f"max_queue must be an integer >= 0 (0: no limit); got {max_queue!r}")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        if close_on_shutdown:
            engine.close()

    # /docs and /redoc from the Swagger UI and ReDoc files fastapi-offline ships (under
    # DOCS_ASSETS), not from a CDN: the pages work on a machine without internet. No validator
    # badge either: Swagger UI would send the spec to validator.swagger.io for it.
    app = FastAPIOffline(title="Kindling", version=__version__, lifespan=lifespan, static_url=DOCS_ASSETS,
                         swagger_ui_parameters={"validatorUrl": None},
                         description="Cold-start recommendations over one Kindling store.")
    metrics = Metrics()
    batcher = RecommendBatcher(engine, batch_window_s)
    app.add_middleware(ServiceMiddleware, metrics=metrics, max_body=max_body, max_queue=max_queue)
    if worker is not None:  # outermost: a forwarded write is shed, limited and counted by the writer
        from .forward import WorkerMiddleware

        app.add_middleware(WorkerMiddleware, link=worker, engine=engine, max_body=max_body)
    errors.install(app, keyed=api_key is not None)
    writer = [Depends(_writer(api_key))]

    @app.post("/recommend", summary="Top-k items for a user, new or known")
    async def recommend(body: RecommendBody,
                        creds: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> dict[str, Any]:
        """Calls without a profile or `exclude` that arrive together are answered by one batched
        call (`kindling serve --batch-window-ms`); each gets the list it would get alone."""
        if body.profile is not None:  # the profile is saved with the user: a write
            _check_key(api_key, creds)
        if body.profile is None and not body.exclude:
            recs = await batcher.recommend(body.user_id, Options(body.k, body.filter(), body.diversity, body.explain))
        else:
            recs = await run_in_threadpool(
                engine.recommend, body.user_id, k=body.k, profile=body.profile, filter=body.filter(),
                exclude=body.exclude, diversity=body.diversity, explain=body.explain)
        return {"user": body.user_id, "items": [r.as_dict() for r in recs]}

    @app.post("/recommend/batch", summary="Top-k items for each of several users (one batched search)")
    def recommend_batch(body: BatchBody) -> dict[str, Any]:
        lists = engine.recommend_many(body.user_ids, k=body.k, filter=body.filter(),
                                      diversity=body.diversity, explain=body.explain)
        return {"users": [{"user": u, "items": [r.as_dict() for r in recs]}
                          for u, recs in zip(body.user_ids, lists)]}

    @app.get("/items/{item_id:path}/similar", summary="The items most similar to one item")
    def similar(item_id: str, q: Annotated[SimilarQuery, Query()]) -> dict[str, Any]:
        recs = engine.similar_items(item_id, k=q.k, filter=q.filter(), exclude=q.exclude)
        return {"item": item_id, "items": [r.as_dict() for r in recs]}

    @app.get("/items/{item_id:path}", summary="One live item")
    def get_item(item_id: str) -> dict[str, Any]:
        item = engine.get_item(item_id)
        return {"item_id": item.item_id, "title": item.title, "text": item.text,
                "categories": list(item.categories), "expires_at": item.expires_at}

    @app.post("/events", dependencies=writer, summary="Record a click, skip, impression or dislike")
    def record(body: EventBody) -> dict[str, Any]:
        """Answers only once the event is in the fsynced log (it survives a crash from then on)."""
        engine.record(body.user_id, body.item_id, body.event, body.value, body.timestamp)
        return {"recorded": body.model_dump()}

    @app.post("/items", dependencies=writer, summary="Add items (or replace them, with upsert)")
    def add_items(body: ItemsBody) -> dict[str, Any]:
        items = [Item(i.item_id, i.title, i.text, tuple(i.categories), i.expires_at) for i in body.items]
        return {"added": engine.add_items(items, upsert=body.upsert)}

    @app.delete("/items/{item_id:path}", dependencies=writer, summary="Remove an item for good")
    def remove_item(item_id: str) -> dict[str, Any]:
        return {"removed": engine.remove_items([item_id])}

    @app.get("/users/{user_id:path}", summary="A user's clicks, oldest first")
    def user(user_id: str) -> dict[str, Any]:
        return {"user": user_id, "history": engine.user_history(user_id)}

    @app.get("/stats", summary="Counts, index and model of the store")
    def stats() -> dict[str, Any]:
        return engine.stats()

    @app.get("/healthz", summary="200 while the store is open")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "generation": engine.stats()["generation"]}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def playground() -> HTMLResponse:
        return HTMLResponse(PLAYGROUND.read_text(encoding="utf-8"))

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(engine.stats()) + batcher.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


#: Shows the key as a "Bearer" scheme in /docs (with an Authorize button); we check it ourselves.
BEARER = HTTPBearer(auto_error=False, description="The server's API key (kindling serve --api-key-file).")


def _writer(api_key: str | None):
    """A dependency that lets a write through only with `Authorization: Bearer <api_key>`."""
    def check(creds: HTTPAuthorizationCredentials | None = Depends(BEARER)) -> None:
        _check_key(api_key, creds)
    return check


def _check_key(api_key: str | None, creds: HTTPAuthorizationCredentials | None) -> None:
    if api_key is None:
        return
    given = b"" if creds is None else creds.credentials.encode()
    if not hmac.compare_digest(given, api_key.encode()):
        raise HTTPException(401, "this route writes to the store and needs 'Authorization: Bearer <key>' "
                                 "with the server's API key", headers={"WWW-Authenticate": "Bearer"})


__all__ = ["MAX_BODY_BYTES", "create_app"]

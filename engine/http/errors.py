"""Every error the service answers with, mapped to a status code in one place.

A response body is always `{"detail": "<message naming the rule>"}`; no traceback leaves the
process (an unexpected exception is logged and answered with a plain 500).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import (
    ClusterError, DuplicateItemError, EngineError, InvalidInputError, MissingExtraError, ReadOnlyStoreError,
    StoreError, UnknownItemError, UnknownUserError,
)

log = logging.getLogger(__name__)

#: The engine's error classes and their status codes, most specific first (the first match wins).
STATUS: tuple[tuple[type[Exception], int], ...] = (
    (DuplicateItemError, 409),   # an id already held, without upsert
    (UnknownItemError, 404),
    (UnknownUserError, 404),
    (InvalidInputError, 400),    # a rule broken by a value; the message names it
    (ReadOnlyStoreError, 403),   # a write sent to a read-only replica: writes go to the writer
    (StoreError, 503),           # the store is closed (shutting down), locked or unreadable
    (ClusterError, 503),         # a cluster the work was sent to (Ray) failed there: retry later
    (MissingExtraError, 500),    # the server runs without a package this store needs: fix the install
    (EngineError, 500),
)


def status_of(exc: Exception) -> int:
    return next((code for cls, code in STATUS if isinstance(exc, cls)), 500)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[int, str]:
    """One line per broken rule, e.g. `body.k: Input should be a valid integer`; 400 for bad JSON."""
    errors = exc.errors()
    bad_json = [e for e in errors if e.get("type") == "json_invalid"]
    if bad_json:
        reason = (bad_json[0].get("ctx") or {}).get("error", "")
        return 400, f"the request body must be valid JSON{': ' + str(reason) if reason else ''}"
    status = 422
    parts = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()))
        parts.append(f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid")))
    return status, "; ".join(parts) or "invalid request"


def install(app: FastAPI) -> None:
    """Register the handlers: engine errors, schema errors, HTTP errors, and anything else."""

    @app.exception_handler(EngineError)
    async def engine_error(request: Request, exc: EngineError) -> JSONResponse:
        status = status_of(exc)
        if status == 500:
            log.exception("engine error on %s %s", request.method, request.url.path)
        return error(status, str(exc))

    @app.exception_handler(RequestValidationError)
    async def schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(*validation_message(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); see the server log")


__all__ = ["STATUS", "install", "status_of"]

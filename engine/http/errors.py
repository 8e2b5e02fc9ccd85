"""Every error the service answers with, mapped to a status code in one place.

A response body is always `{"detail": "<message naming the rule>"}`; no traceback leaves the
process (an unexpected exception is logged and answered with a plain 500).
"""

from __future__ import annotations

import logging

from typing import Any

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


#: The body of every error answer, as the OpenAPI schema documents it.
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error", "type": "object", "required": ["detail"], "additionalProperties": False,
    "properties": {"detail": {"type": "string", "title": "Detail", "description": "The rule the request broke."}},
}
#: What each error status means, as /docs shows it.
MEANING = {
    400: "A value breaks a rule (the message names it), or the body is not valid JSON.",
    401: "A write without the server's API key.",
    403: "A write sent to a read-only store.",
    404: "An unknown item or user.",
    409: "An item id the store already holds, without upsert.",
    413: "The request body is over the server's limit.",
    422: "The request does not have the documented shape or types.",
    503: "The server is at its limit of requests at once (Retry-After), or the store is closed.",
}
#: Errors that follow from what one route does, beyond those its parameters imply (documented()).
ROUTE_ERRORS = {("post", "/events"): (404,), ("post", "/items"): (409,)}
#: Operations that need the API key for some requests only (/recommend: one that carries a
#: profile, which is saved); FastAPI documents the key as always required.
KEY_SOMETIMES = {("post", "/recommend")}


def documented(method: str, path: str, operation: dict[str, Any]) -> tuple[int, ...]:
    """The error statuses one operation of the OpenAPI schema may answer with."""
    codes = {503}  # shed, or the store closed under it
    if operation.get("parameters") or operation.get("requestBody"):
        codes |= {400, 422}
    if operation.get("requestBody"):
        codes.add(413)
    if any(p.get("in") == "path" for p in operation.get("parameters", ())):
        codes.add(404)
    if operation.get("security"):
        codes |= {401, 403}
    return tuple(sorted(codes | set(ROUTE_ERRORS.get((method, path), ()))))


def document_errors(schema: dict[str, Any], keyed: bool = True) -> dict[str, Any]:
    """`schema` (an OpenAPI document) with every error answer documented as `{"detail": "..."}`
    (FastAPI documents 422 as its own list of validation errors, which errors.py never sends),
    and the key documented as optional where only some requests need it; with `keyed` False (a
    server without an API key) as needed nowhere."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components.pop("HTTPValidationError", None)
    components.pop("ValidationError", None)
    components["Error"] = ERROR_SCHEMA
    content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            if not keyed:
                operation.pop("security", None)
            elif (method, path) in KEY_SOMETIMES and operation.get("security"):
                operation["security"] = [{}, *operation["security"]]  # {}: no key is also accepted
            responses = operation.setdefault("responses", {})
            for code in documented(method, path, operation):
                responses[str(code)] = {"description": MEANING[code], "content": content}
    return schema


def install(app: FastAPI, keyed: bool = True) -> None:
    """Register the handlers: engine errors, schema errors, HTTP errors, and anything else; and
    document the errors' shape in the app's OpenAPI schema (`keyed`: the server checks an API key
    on writes; without one the schema names no key)."""
    make_schema = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(make_schema(), keyed)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

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


__all__ = ["ERROR_SCHEMA", "STATUS", "document_errors", "install", "status_of"]

"""One error body for every HTTP answer that is not a success, and its OpenAPI documentation.

Every refusal of both APIs is ``{"error": <short code>, "detail": <human-readable message>}``: the
route's own refusals, FastAPI's request validation (422, which by default answers a different
``HTTPValidationError`` shape), Starlette's 404/405, and a database that cannot answer in time (503).
``error_responses`` documents the codes a route can answer with that same schema.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Final

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.routing import Match

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    """The body of every error answer."""

    error: str
    detail: str


# The short code of an error answer whose code the raiser did not choose (an HTTPException).
_ERROR_BY_STATUS: Final[Mapping[int, str]] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    422: "invalid_request",
    429: "too_many_requests",
    503: "dependency_unavailable",
}

DEFAULT_DESCRIPTIONS: Final[Mapping[int, str]] = {
    400: "the body could not be parsed at all (not UTF-8 text, for one)",
    401: "no API key, or an unknown, revoked or expired one",
    403: "the key may not act for this user",
    404: "not found",
    409: "conflict; retry after the Retry-After header's seconds",
    413: "the request body is over the configured limit",
    422: "invalid input; the detail names the field and the rule",
    429: "too many requests; retry after the Retry-After header's seconds",
    503: "a dependency cannot answer now; retry after the Retry-After header's seconds",
}

_RETRY_AFTER: Final = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer", "minimum": 0}}
}
_WITH_RETRY_AFTER: Final = frozenset({409, 429, 503})


def error_responses(*codes: int, described: Mapping[int, str] | None = None) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route: each code with the shared error body and a description."""
    descriptions = {**DEFAULT_DESCRIPTIONS, **(described or {})}
    documented: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorBody, "description": descriptions[code]}
        if code in _WITH_RETRY_AFTER:
            entry["headers"] = _RETRY_AFTER
        documented[code] = entry
    return documented


def error_response(status: int, error: str, detail: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=dict(headers or {}))


def describe_validation_errors(errors: Sequence[Any]) -> str:
    """FastAPI's validation errors as one readable clause per problem: where, then what. Pure."""
    parts: list[str] = []
    for error in errors:
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "json_invalid":  # loc is ("body", <character position>)
            context = error.get("ctx") or {}
            parts.append(f"body: {message}: {context['error']}" if context.get("error") else f"body: {message}")
            continue
        where = _where([str(p) for p in error.get("loc", ())])
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


def _where(loc: Sequence[str]) -> str:
    """``body.user_id``, ``query parameter 'limit'``, ``header parameter 'idempotency-key'``."""
    if not loc:
        return ""
    source, path = loc[0], loc[1:]
    if source in ("query", "path", "header", "cookie") and path:
        return f"{source} parameter {path[0]!r}"
    return ".".join(loc)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(422, "invalid_request", describe_validation_errors(exc.errors()))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code in (204, 304) or exc.status_code < 200:
        return Response(status_code=exc.status_code, headers=headers)
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    error = _ERROR_BY_STATUS.get(exc.status_code, "http_error")
    return error_response(exc.status_code, error, str(exc.detail), headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's own ``Allow`` names only the first route
    matching the path, so a path served by two routes (GET and POST apart) would be under-reported."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    return sorted(methods)


# What a database that cannot answer raises: the pool's acquire or command timeout, a lost connection.
DATABASE_UNAVAILABLE: Final = (TimeoutError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError)


async def database_unavailable(request: Request, exc: Exception) -> Response:
    log.warning("%s %s: database unavailable: %r", request.method, request.url.path, exc)
    detail = "the database did not answer in time; retry shortly"
    return error_response(503, "dependency_unavailable", detail, {"Retry-After": "1"})


def install_error_handlers(app: FastAPI) -> None:
    """The shared error shape for FastAPI's and Starlette's own refusals, and 503 for a database that cannot answer."""
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    for exc_type in DATABASE_UNAVAILABLE:
        app.add_exception_handler(exc_type, database_unavailable)

"""The one authentication dependency of both APIs: ``caller: CallerDep`` in a route.

The key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; each service's deps carry
its ``Authenticator`` (``app.state.deps.authenticator``). Refusals share one body shape,
``{"error": ..., "detail": ...}``: 401 ``unauthorized`` with ``WWW-Authenticate: Bearer``, 403
``forbidden``, 503 ``dependency_unavailable`` when keys cannot be looked up. ``add_auth_handlers``
installs their handler on an app.
"""

from __future__ import annotations

from typing import Annotated, Protocol

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from tenancy.authenticator import Authenticator, AuthUnavailable, Unauthorized
from tenancy.caller import Caller

# auto_error=False: a missing key is the authenticator's decision (open mode), not the scheme's.
_bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer mlp_<id>_<secret>`")
_api_key = APIKeyHeader(name="X-API-Key", auto_error=False, description="an API key, as a header of its own")


class AuthRefused(Exception):
    """A request the caller may not make: answered with ``status`` and the shared error body."""

    def __init__(self, status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers


class _HasAuthenticator(Protocol):
    @property
    def authenticator(self) -> Authenticator: ...


def authenticator_of(connection: HTTPConnection) -> Authenticator:
    deps: _HasAuthenticator = connection.app.state.deps
    return deps.authenticator


async def current_caller(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    api_key: Annotated[str | None, Depends(_api_key)],
) -> Caller:
    return await _authenticate(authenticator_of(request), bearer, api_key)


async def caller_of(connection: HTTPConnection) -> Caller:
    """``current_caller`` outside FastAPI's dependency solving (the gateway's submit fast path): the same two
    schemes read the same headers. Raises ``AuthRefused``."""
    return await _authenticate(authenticator_of(connection), await _bearer(connection), await _api_key(connection))


async def _authenticate(
    authenticator: Authenticator, bearer: HTTPAuthorizationCredentials | None, api_key: str | None
) -> Caller:
    presented = api_key or (bearer.credentials if bearer is not None else None)
    try:
        return await authenticator.authenticate(presented)
    except Unauthorized as exc:
        raise AuthRefused(401, "unauthorized", exc.detail, {"WWW-Authenticate": "Bearer"}) from exc
    except AuthUnavailable as exc:
        detail = "API keys cannot be checked now; try again shortly"
        raise AuthRefused(503, "dependency_unavailable", detail, {"Retry-After": "5"}) from exc


CallerDep = Annotated[Caller, Depends(current_caller)]


def require_user(caller: Caller, user_id: str) -> None:
    """A user's own data (quota, usage, keys): 403 for another user's, unless the caller is an admin."""
    if not caller.may_see_user(user_id):
        raise AuthRefused(403, "forbidden", f"this API key belongs to another user than {user_id!r}")


def require_admin(caller: Caller) -> None:
    if not caller.is_admin:
        raise AuthRefused(403, "forbidden", "this route needs an admin API key (`mlp keys create USER --admin`)")


def refusal_response(exc: AuthRefused) -> JSONResponse:
    return JSONResponse({"error": exc.error, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


async def _answer_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, AuthRefused)
    return refusal_response(exc)


def add_auth_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AuthRefused, _answer_refusal)

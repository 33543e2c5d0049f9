"""Key management over HTTP, admin keys only: what ``mlp keys`` does, on the gateway.

  POST   /api/v1/keys                  create a key; the response holds it, once
  GET    /api/v1/keys[?user_id=]       list keys (ids, owners, states; never a key or its hash)
  DELETE /api/v1/keys/{key_id}         revoke now
  POST   /api/v1/keys/{key_id}/rotate  a new key; the old one works for the grace period (default 24h)

A change through this replica is seen by it at once (its cache forgets the key); other replicas see it
within their cache TTL (``MLP_AUTH_CACHE_TTL_S``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from api_gateway.deps import AuthenticatorDep
from api_gateway.schemas import ErrorBody, UserId
from events.request_rules import IDENTIFIER_PATTERN
from tenancy.authenticator import STORE_ERRORS
from tenancy.http import CallerDep, require_admin
from tenancy.key_store import CreatedKey, KeyNotRotatable, UnknownKey
from tenancy.keys import (
    DEFAULT_GRACE,
    KEY_ID_PATTERN,
    MAX_GRACE,
    MAX_LIFETIME,
    KeyRecord,
    KeyState,
    parse_duration,
)

router = APIRouter(tags=["keys"])

KeyId = Annotated[str, Path(pattern=KEY_ID_PATTERN, description="the key's public id (12 hex characters)")]
Duration = Annotated[str, StringConstraints(pattern=r"^\d{1,6}[smhdw]$")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "a body that is not JSON (or not UTF-8)"},
    401: {"model": ErrorBody},
    403: {"model": ErrorBody},
    404: {"model": ErrorBody},
    409: {"model": ErrorBody},
    422: {"model": ErrorBody, "description": "invalid input, e.g. a duration of zero or over the maximum"},
    503: {"model": ErrorBody},
}


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: UserId
    scope: Literal["user", "admin"] = "user"
    expires_in: Duration | None = Field(default=None, description="lifetime, e.g. 90d, 24h; none: no expiry")


class KeyRotate(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    grace: Duration = Field(default="24h", description="how long the old key keeps working, e.g. 24h, 0s")


class KeyOut(BaseModel):
    key_id: str
    user_id: str
    scope: Literal["user", "admin"]
    state: KeyState
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    replaced_by: str | None

    @classmethod
    def of(cls, record: KeyRecord, now: datetime) -> KeyOut:
        return cls(
            key_id=record.key_id,
            user_id=record.user_id,
            scope=record.scope,
            state=record.state(now),
            created_at=record.created_at,
            expires_at=record.expires_at,
            revoked_at=record.revoked_at,
            last_used_at=record.last_used_at,
            replaced_by=record.replaced_by,
        )


class KeyCreated(KeyOut):
    key: str = Field(description="the API key; shown only here, store it now")

    @classmethod
    def of_created(cls, created: CreatedKey, now: datetime) -> KeyCreated:
        return cls(key=created.plaintext, **KeyOut.of(created.record, now).model_dump())


class KeyRotated(BaseModel):
    new: KeyCreated
    old: KeyOut


class KeyList(BaseModel):
    items: list[KeyOut]


def _error(status: int, error: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def _unavailable(exc: Exception) -> JSONResponse:
    detail = f"the key store is unavailable: {type(exc).__name__}"
    return _error(503, "dependency_unavailable", detail, {"Retry-After": "5"})


def _invalid(exc: ValueError) -> JSONResponse:
    return _error(422, "invalid_request", str(exc))


@router.post("/api/v1/keys", status_code=201, response_model=KeyCreated, responses=_ERRORS)
async def create_key(body: KeyCreate, caller: CallerDep, auth: AuthenticatorDep) -> KeyCreated | JSONResponse:
    require_admin(caller)
    now = auth.now()
    try:
        lifetime = None if body.expires_in is None else parse_duration(body.expires_in, maximum=MAX_LIFETIME)
        created = await auth.store.create(body.user_id, body.scope, now, None if lifetime is None else now + lifetime)
    except ValueError as exc:
        return _invalid(exc)
    except STORE_ERRORS as exc:
        return _unavailable(exc)
    auth.forget(created.record.key_id)  # open mode ends here at once
    return KeyCreated.of_created(created, now)


@router.get("/api/v1/keys", response_model=KeyList, responses=_ERRORS)
async def list_keys(
    caller: CallerDep,
    auth: AuthenticatorDep,
    user_id: Annotated[str | None, Query(pattern=IDENTIFIER_PATTERN)] = None,
) -> KeyList | JSONResponse:
    require_admin(caller)
    try:
        records = await auth.store.list(user_id)
    except STORE_ERRORS as exc:
        return _unavailable(exc)
    now = auth.now()
    return KeyList(items=[KeyOut.of(r, now) for r in records])


@router.delete("/api/v1/keys/{key_id}", response_model=KeyOut, responses=_ERRORS)
async def revoke_key(key_id: KeyId, caller: CallerDep, auth: AuthenticatorDep) -> KeyOut | JSONResponse:
    require_admin(caller)
    now = auth.now()
    try:
        record, _ = await auth.store.revoke(key_id, now)
    except UnknownKey:
        return _error(404, "not_found", f"no API key {key_id}")
    except STORE_ERRORS as exc:
        return _unavailable(exc)
    auth.forget(key_id)
    return KeyOut.of(record, now)


@router.post("/api/v1/keys/{key_id}/rotate", status_code=201, response_model=KeyRotated, responses=_ERRORS)
async def rotate_key(
    key_id: KeyId, caller: CallerDep, auth: AuthenticatorDep, body: KeyRotate | None = None
) -> KeyRotated | JSONResponse:
    require_admin(caller)
    now = auth.now()
    try:
        grace = DEFAULT_GRACE if body is None else parse_duration(body.grace, maximum=MAX_GRACE, allow_zero=True)
        rotated = await auth.store.rotate(key_id, now, grace)
    except UnknownKey:
        return _error(404, "not_found", f"no API key {key_id}")
    except KeyNotRotatable as exc:
        return _error(409, "conflict", str(exc))
    except ValueError as exc:
        return _invalid(exc)
    except STORE_ERRORS as exc:
        return _unavailable(exc)
    auth.forget(key_id)
    return KeyRotated(new=KeyCreated.of_created(rotated.created, now), old=KeyOut.of(rotated.old, now))

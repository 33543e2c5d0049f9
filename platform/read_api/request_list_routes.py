"""``GET /api/v1/inference``: the caller's requests, newest first, a page at a time by opaque cursor.

Filters: ``status``, ``model``, and the creation time as ``since`` (inclusive) and ``until`` (exclusive),
ISO-8601 date-times (without an offset: UTC). An admin lists everyone's requests, or one user's with
``user_id``; a user key lists its own (its own ``user_id`` may be passed, another user's is 403).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response
from msgspec import json as msgspec_json

from events.status import Status
from mlp.http_errors import error_response, error_responses
from projections.listing import (
    CURSOR_PATTERN,
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    ListFilters,
    as_utc,
    decode_cursor,
    list_requests,
)
from quota.plans import USER_ID
from read_api.deps import PoolDep
from read_api.schemas import RequestPageOut
from tenancy.caller import Caller
from tenancy.http import CallerDep

router = APIRouter(tags=["requests"])
_encoder = msgspec_json.Encoder()
MODEL_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"


class NotVisible(Exception):
    """The caller asked for another user's requests."""


def listed_user(caller: Caller, requested: str | None) -> str | None:
    """Whose requests the caller lists; None: everyone's. Pure."""
    if requested is not None:
        if not caller.may_see_user(requested):
            raise NotVisible(requested)
        return requested
    if caller.is_admin:
        return None
    if caller.user_id is None:  # a user-scoped caller always has a user; never widen to everyone's
        raise NotVisible("")
    return caller.user_id


@router.get(
    "/api/v1/inference",
    response_model=RequestPageOut,
    responses=error_responses(
        401,
        403,
        422,
        503,
        described={403: "user_id names another user (only an admin may list other users' requests)"},
    ),
)
async def list_inference(
    caller: CallerDep,
    pool: PoolDep,
    status: Annotated[Status | None, Query(description="only requests in this status")] = None,
    model: Annotated[str | None, Query(pattern=MODEL_PATTERN, description="only requests for this model")] = None,
    user_id: Annotated[
        str | None, Query(pattern=USER_ID.pattern, description="whose requests (default: the caller's)")
    ] = None,
    since: Annotated[datetime | None, Query(description="created at or after (ISO-8601; no offset: UTC)")] = None,
    until: Annotated[datetime | None, Query(description="created before (ISO-8601; no offset: UTC)")] = None,
    cursor: Annotated[
        str | None, Query(pattern=CURSOR_PATTERN, description="the previous page's next_cursor, as given")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="items per page")] = DEFAULT_PAGE_SIZE,
) -> Response:
    try:
        user = listed_user(caller, user_id)
    except NotVisible:
        return error_response(403, "forbidden", "only an admin may list another user's requests")
    filters = ListFilters(
        user_id=user,
        status=status,
        model=model,
        since=as_utc(since) if since is not None else None,
        until=as_utc(until) if until is not None else None,
        after=decode_cursor(cursor) if cursor is not None else None,  # the pattern was checked: always valid
    )
    page = await list_requests(pool, filters, limit)
    return Response(_encoder.encode(page), media_type="application/json")

"""``GET /api/v1/inference``: the caller's requests, newest first, a page at a time by opaque cursor.

Filters: ``status``, ``model``, and the creation time as ``since`` (inclusive) and ``until`` (exclusive),
RFC 3339 date-times (``2031-03-01T12:00:00Z``, offset required). An admin lists everyone's requests, or one user's with
``user_id``; a user key lists its own (its own ``user_id`` may be passed, another user's is 403).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query
from fastapi.responses import Response
from msgspec import json as msgspec_json

from events.request_rules import IDENTIFIER_PATTERN
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
from read_api.deps import PoolDep
from read_api.schemas import RequestPageOut
from tenancy.caller import Caller
from tenancy.http import CallerDep

router = APIRouter(tags=["requests"])
_encoder = msgspec_json.Encoder()
MODEL_PATTERN = r"^[A-Za-z0-9_\-]{1,64}$"
# RFC 3339 date-time, what the schema's format: date-time promises (pydantic's datetime would also take
# a bare date, a space separator or a number of seconds).
_RFC3339: Final = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")
_DATE_TIME: Final[dict[str, Any]] = {"format": "date-time"}


class BadTime(ValueError):
    pass


def parse_time(name: str, value: str) -> datetime:
    """An RFC 3339 date-time, in UTC. Pure; BadTime names the parameter and the expected form."""
    if not _RFC3339.fullmatch(value):
        raise BadTime(f"query parameter {name!r} must be an RFC 3339 date-time such as 2031-03-01T12:00:00Z")
    text = value.upper()
    if text[17:19] == "60":  # a leap second: RFC 3339 allows it, datetime does not
        text = text[:17] + "59" + text[19:]
    try:
        return as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise BadTime(f"query parameter {name!r} is not a real date-time: {value!r}") from None


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
        str | None, Query(pattern=IDENTIFIER_PATTERN, description="whose requests (default: the caller's)")
    ] = None,
    since: Annotated[
        str | None, Query(max_length=64, description="created at or after (RFC 3339)", json_schema_extra=_DATE_TIME)
    ] = None,
    until: Annotated[
        str | None, Query(max_length=64, description="created before (RFC 3339)", json_schema_extra=_DATE_TIME)
    ] = None,
    cursor: Annotated[
        str | None, Query(pattern=CURSOR_PATTERN, description="the previous page's next_cursor, as given")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE, description="items per page")] = DEFAULT_PAGE_SIZE,
) -> Response:
    try:
        user = listed_user(caller, user_id)
    except NotVisible:
        return error_response(403, "forbidden", "only an admin may list another user's requests")
    try:
        first = parse_time("since", since) if since is not None else None
        last = parse_time("until", until) if until is not None else None
    except BadTime as exc:
        return error_response(422, "invalid_request", str(exc))
    filters = ListFilters(
        user_id=user,
        status=status,
        model=model,
        since=first,
        until=last,
        after=decode_cursor(cursor) if cursor is not None else None,  # the pattern was checked: always valid
    )
    page = await list_requests(pool, filters, limit)
    return Response(_encoder.encode(page), media_type="application/json")

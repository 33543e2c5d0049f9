"""Quota and usage routes of the read API.

``GET /api/v1/users/{user_id}/quota``: per window (day, month) limit, used, reserved, remaining,
resets_at, from the Redis ledger (rebuilt from Postgres first if Redis lost it).
``GET /api/v1/users/{user_id}/usage?from=YYYY-MM-DD&to=YYYY-MM-DD``: per-day, per-model token
totals from Postgres ``token_usage_daily``.

Dependencies (QuotaService) come typed from ``read_api.deps``; its errors are the quota context's.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from typing import Annotated, Any, Final

from fastapi import APIRouter, HTTPException, Path, Query
from pydantic import BaseModel, ConfigDict, Field

from events.model import utc_now
from events.request_rules import IDENTIFIER_PATTERN
from mlp.http_errors import error_responses
from quota.ledger import QuotaUnavailable
from quota.plans import day_of
from quota.service import QuotaView
from read_api.deps import QuotaDep
from tenancy.http import CallerDep, require_user

router = APIRouter(tags=["quota"])

MAX_USAGE_RANGE_DAYS: Final = 366
DEFAULT_USAGE_RANGE_DAYS: Final = 30
_ISO_DATE: Final = re.compile(r"^\d{4}-\d{2}-\d{2}$")

UserId = Annotated[str, Path(pattern=IDENTIFIER_PATTERN, description="the user's id")]
# The dates are parsed by date_range (its messages say what is wrong); the schema states the format.
_DATE: Final[dict[str, Any]] = {"format": "date"}


class WindowOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built straight from quota.service.WindowUsage

    window: str
    id: str
    limit: int
    used: int
    reserved: int
    remaining: int
    starts_at: datetime
    resets_at: datetime


class QuotaOut(BaseModel):
    user_id: str
    plan: str
    requests_per_minute: int
    max_tokens_per_request: int
    windows: list[WindowOut]

    @classmethod
    def of(cls, view: QuotaView) -> QuotaOut:
        return cls(
            user_id=view.user_id,
            plan=view.plan,
            requests_per_minute=view.requests_per_minute,
            max_tokens_per_request=view.max_tokens_per_request,
            windows=[WindowOut.model_validate(view.day), WindowOut.model_validate(view.month)],
        )


class DayUsageOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)  # built straight from quota.store.DailyUsage

    day: date
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int


class UsageTotalsOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    requests: int


class UsageOut(BaseModel):
    user_id: str
    # "from" is a Python keyword: the attribute is from_, the JSON key is "from".
    from_: date = Field(serialization_alias="from")
    to: date
    days: list[DayUsageOut]
    totals: UsageTotalsOut


class DateRangeError(ValueError):
    pass


def parse_date(name: str, value: str) -> date:
    if not _ISO_DATE.fullmatch(value):
        raise DateRangeError(f"'{name}' must be a date as YYYY-MM-DD, got {value!r}")
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise DateRangeError(f"'{name}' is not a real date: {value!r}") from None


def date_range(first: str | None, last: str | None, today: date) -> tuple[date, date]:
    """The validated [from, to] range (inclusive); defaults to the last 30 days up to today (UTC)."""
    to = parse_date("to", last) if last is not None else today
    start = parse_date("from", first) if first is not None else to - timedelta(days=DEFAULT_USAGE_RANGE_DAYS - 1)
    if start > to:
        raise DateRangeError(f"'from' ({start}) must not be after 'to' ({to})")
    if (to - start).days + 1 > MAX_USAGE_RANGE_DAYS:
        raise DateRangeError(f"the range covers {(to - start).days + 1} days; at most {MAX_USAGE_RANGE_DAYS}")
    return start, to


def _unavailable(exc: Exception) -> HTTPException:
    return HTTPException(status_code=503, detail=f"quota state unavailable: {exc}", headers={"Retry-After": "1"})


_FORBIDDEN = "another user's (only an admin key reads every user's)"


@router.get(
    "/api/v1/users/{user_id}/quota",
    response_model=QuotaOut,
    responses=error_responses(401, 403, 422, 503, described={403: _FORBIDDEN}),
)
async def get_quota(user_id: UserId, quota: QuotaDep, caller: CallerDep) -> QuotaOut:
    require_user(caller, user_id)
    try:
        view = await quota.view(user_id)
    except QuotaUnavailable as exc:
        raise _unavailable(exc) from exc
    return QuotaOut.of(view)


@router.get(
    "/api/v1/users/{user_id}/usage",
    response_model=UsageOut,
    responses=error_responses(
        401,
        403,
        422,
        503,
        described={
            403: _FORBIDDEN,
            422: "invalid input; also 'from' after 'to', or a range over 366 days",
        },
    ),
)
async def get_usage(
    user_id: UserId,
    quota: QuotaDep,
    caller: CallerDep,
    first: Annotated[
        str | None, Query(alias="from", max_length=10, description="first day, YYYY-MM-DD", json_schema_extra=_DATE)
    ] = None,
    last: Annotated[
        str | None, Query(alias="to", max_length=10, description="last day, YYYY-MM-DD", json_schema_extra=_DATE)
    ] = None,
) -> UsageOut:
    require_user(caller, user_id)
    try:
        start, end = date_range(first, last, day_of(utc_now()))
    except DateRangeError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    try:
        rows = await quota.daily_usage(user_id, start, end)
    except QuotaUnavailable as exc:
        raise _unavailable(exc) from exc
    days = [DayUsageOut.model_validate(r) for r in rows]
    totals = UsageTotalsOut(
        prompt_tokens=sum(r.prompt_tokens for r in rows),
        completion_tokens=sum(r.completion_tokens for r in rows),
        total_tokens=sum(r.total_tokens for r in rows),
        requests=sum(r.requests for r in rows),
    )
    return UsageOut(user_id=user_id, from_=start, to=end, days=days, totals=totals)

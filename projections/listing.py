"""Listing requests newest first, by keyset cursor (``GET /api/v1/inference``).

The order is ``(created_at, request_id)`` descending: total (request ids are unique) and stable (a row's
``created_at`` is the InferenceRequested's ``occurred_at``, written once), so a page starts strictly
after the previous page's last row and requests arriving meanwhile, newer than every row already
listed, can neither repeat a row nor push one off the pages still to come. Rows whose InferenceRequested
is not projected yet (``created_at`` NULL: only a later event of theirs arrived first) are listed once
it is. Migration 0004 has the indexes for both orders (per user, and across users for an admin).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import msgspec

from projections.postgres import Connection
from projections.queries import RequestView, select_view_sql

# A cursor is opaque to clients. Every string of this pattern is a valid position (the time is clamped to
# the representable range), so a well-formed cursor is never refused.
CURSOR_PATTERN: Final = r"^-?[0-9]{1,18}\.[A-Za-z0-9_\-:@]{1,128}$"
_CURSOR: Final = re.compile(CURSOR_PATTERN)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)
_EARLIEST: Final = datetime.min.replace(tzinfo=UTC)
_LATEST: Final = datetime.max.replace(tzinfo=UTC)
_MIN_US: Final = (_EARLIEST - _EPOCH) // _MICROSECOND
_MAX_US: Final = (_LATEST - _EPOCH) // _MICROSECOND

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 200


@dataclass(frozen=True, slots=True)
class Position:
    """Where a page ends: the last listed row's ``(created_at, request_id)``."""

    created_at: datetime
    request_id: str


def encode_cursor(position: Position) -> str:
    micros = (position.created_at - _EPOCH) // _MICROSECOND
    return f"{micros}.{position.request_id}"


def decode_cursor(cursor: str) -> Position:
    """The position a cursor names. Raises ValueError for a string that is not of ``CURSOR_PATTERN``."""
    if not _CURSOR.fullmatch(cursor):
        raise ValueError("not a cursor of this API: pass back next_cursor as it was given")
    micros, _, request_id = cursor.partition(".")
    clamped = min(max(int(micros), _MIN_US), _MAX_US)
    return Position(created_at=_EPOCH + clamped * _MICROSECOND, request_id=request_id)


def as_utc(moment: datetime) -> datetime:
    """A client's time bound in UTC (naive means UTC), clamped to the representable range. Pure."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # e.g. 9999-12-31T23:00-05:00 is past datetime.max in UTC
        return _LATEST if moment.year > 1 else _EARLIEST


@dataclass(frozen=True, slots=True)
class ListFilters:
    """What to list. ``user_id`` None: every user's requests (admins and open mode only)."""

    user_id: str | None = None
    status: str | None = None
    model: str | None = None
    since: datetime | None = None  # created_at >= since
    until: datetime | None = None  # created_at < until
    after: Position | None = None  # the previous page's end


def list_requests_sql(filters: ListFilters, limit: int) -> tuple[str, list[Any]]:
    """The statement and arguments of one page (``limit`` rows). Pure.

    Only the filters given become conditions: a catch-all ``($1 IS NULL OR ...)`` form would keep a
    generic plan from using the indexes.
    """
    conditions = ["r.created_at IS NOT NULL"]
    args: list[Any] = []

    def arg(value: Any) -> str:
        args.append(value)
        return f"${len(args)}"

    if filters.user_id is not None:
        conditions.append(f"r.user_id = {arg(filters.user_id)}")
    if filters.status is not None:
        conditions.append(f"r.status = {arg(filters.status)}")
    if filters.model is not None:
        conditions.append(f"r.model = {arg(filters.model)}")
    if filters.since is not None:
        conditions.append(f"r.created_at >= {arg(filters.since)}")
    if filters.until is not None:
        conditions.append(f"r.created_at < {arg(filters.until)}")
    if filters.after is not None:
        after = filters.after
        conditions.append(f"(r.created_at, r.request_id) < ({arg(after.created_at)}, {arg(after.request_id)})")
    sql = (
        select_view_sql()
        + "WHERE "
        + "\n  AND ".join(conditions)
        + f"\nORDER BY r.created_at DESC, r.request_id DESC\nLIMIT {arg(limit)}"
    )
    return sql, args


class RequestPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[RequestView]
    next_cursor: str | None


async def list_requests(db: asyncpg.Pool | Connection, filters: ListFilters, limit: int) -> RequestPage:
    """One page, newest first; ``next_cursor`` is None on the last page."""
    sql, args = list_requests_sql(filters, limit + 1)  # one more row tells whether another page exists
    rows = await db.fetch(sql, *args)
    items = [RequestView.from_row(row) for row in rows[:limit]]
    more = len(rows) > limit
    last = rows[limit - 1] if more else None
    cursor = encode_cursor(Position(last["created_at"], last["request_id"])) if last is not None else None
    return RequestPage(items=items, next_cursor=cursor)

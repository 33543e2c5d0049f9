"""Read queries over the projections: one request's view, from Postgres or from the status cache.

``get_request`` (Postgres, the truth) and ``RequestView.from_cache`` (the Redis status cache hash)
build the same ``RequestView`` for the same events, so the read API answers identically whichever
source it used.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from projections.postgres import LIVE, Connection, Tables
from projections.status_cache import format_ts, parse_ts

Row = asyncpg.Record | Mapping[str, Any]
# The statuses whose error carries ``error_code``: a failure's code, or "cancelled"/"expired" with the detail.
_CODED = frozenset({"failed", "cancelled", "expired"})


class ResultView(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A generate model's ``{"completion": ...}`` or an embed model's ``{"embedding": [...]}``."""

    completion: str | None = None
    embedding: list[float] | None = None

    @classmethod
    def of(cls, completion: str, embedding_json: str | None) -> ResultView:
        if embedding_json is None:
            return cls(completion=completion)
        return cls(embedding=_embedding.decode(embedding_json))


_embedding = msgspec.json.Decoder(list[float])


class UsageView(msgspec.Struct, frozen=True, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorView(msgspec.Struct, frozen=True, kw_only=True):
    code: str
    message: str


class RequestView(msgspec.Struct, frozen=True, kw_only=True):
    """What a client sees of one request. ``error`` is set for failed and rejected requests
    (for a rejection ``code`` is the reject reason, also given as ``reason``)."""

    request_id: str
    status: str
    user_id: str | None = None
    model: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: ResultView | None = None
    usage: UsageView | None = None
    error: ErrorView | None = None
    reason: str | None = None
    trace_id: str | None = None
    # A queued request's place in its model's queue (1 = next) and the seconds until it starts, when the
    # gateway admitted it (projections.queue_position); the read API fills them in, null otherwise.
    queue_position: int | None = None
    eta_s: float | None = None

    @classmethod
    def from_cache(cls, request_id: str, fields: Mapping[str, str]) -> RequestView:
        """The view of a status cache hash (see ``projections.status_cache`` for its fields)."""
        status = fields["status"]
        result = usage = error = None
        if status == "completed" and "completion" in fields:
            result = ResultView.of(fields["completion"], fields.get("embedding"))
            usage = UsageView(
                prompt_tokens=int(fields["prompt_tokens"]),
                completion_tokens=int(fields["completion_tokens"]),
                total_tokens=int(fields["total_tokens"]),
            )
        reason = fields.get("reason") if status == "rejected" else None
        code = reason if reason is not None else fields.get("error_code") if status in _CODED else None
        if code is not None:
            error = ErrorView(code=code, message=fields.get("error_message", ""))
        return cls(
            request_id=request_id,
            status=status,
            user_id=fields.get("user_id"),
            model=fields.get("model"),
            created_at=_ts(fields.get("created_at")),
            started_at=_ts(fields.get("started_at")),
            finished_at=_ts(fields.get("finished_at")),
            result=result,
            usage=usage,
            error=error,
            reason=reason,
            trace_id=fields.get("trace_id"),
        )

    @classmethod
    def from_row(cls, row: Row) -> RequestView:
        """The view of a row of ``_SELECT_VIEW`` (inference_requests left-joined with inference_results)."""
        status = row["status"]
        result = usage = error = None
        if status == "completed" and row["completion"] is not None:
            result = ResultView.of(row["completion"], row["embedding"])
            usage = UsageView(
                prompt_tokens=row["prompt_tokens"],
                completion_tokens=row["completion_tokens"],
                total_tokens=row["total_tokens"],
            )
        reason = row["reject_reason"] if status == "rejected" else None
        code = reason if reason is not None else row["error_code"] if status in _CODED else None
        if code is not None:
            error = ErrorView(code=code, message=row["error_message"] or "")
        return cls(
            request_id=row["request_id"],
            status=status,
            user_id=row["user_id"],
            model=row["model"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            result=result,
            usage=usage,
            error=error,
            reason=reason,
            trace_id=row["trace_id"],
        )


def cache_fields_of_row(row: Row) -> dict[str, str]:
    """The status cache hash for a row of ``_SELECT_VIEW`` (replay re-populates the cache with it)."""
    fields = {"status": row["status"], "user_id": row["user_id"], "model": row["model"]}
    fields["updated_at"] = format_ts(row["updated_at"])
    for name in ("created_at", "started_at", "finished_at"):
        if row[name] is not None:
            fields[name] = format_ts(row[name])
    if row["trace_id"] is not None:
        fields["trace_id"] = row["trace_id"]
    if row["status"] == "completed" and row["completion"] is not None:
        fields["completion"] = row["completion"]
        if row["embedding"] is not None:
            fields["embedding"] = row["embedding"]
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            fields[name] = str(row[name])
        fields["latency_ms"] = repr(row["latency_ms"])
    if row["status"] in _CODED and row["error_code"] is not None:
        fields["error_code"] = row["error_code"]
        fields["error_message"] = row["error_message"] or ""
    if row["status"] == "rejected" and row["reject_reason"] is not None:
        fields["reason"] = row["reject_reason"]
        fields["error_message"] = row["error_message"] or ""
    return fields


def _ts(value: str | None) -> datetime | None:
    return None if value is None else parse_ts(value)


def select_view_sql(tables: Tables = LIVE) -> str:
    return f"""
SELECT r.request_id, r.status, r.user_id, r.model, r.created_at, r.started_at, r.finished_at, r.updated_at,
       r.trace_id, r.error_code, r.error_message, r.reject_reason,
       x.completion, x.prompt_tokens, x.completion_tokens, x.total_tokens, x.latency_ms, x.embedding::text
FROM {tables.requests} r LEFT JOIN {tables.results} x USING (request_id)
"""


_GET_REQUEST = select_view_sql() + "WHERE r.request_id = $1"


async def get_request(db: asyncpg.Pool | Connection, request_id: str) -> RequestView | None:
    """One request's view from Postgres, or None when no event of it has been projected."""
    row = await db.fetchrow(_GET_REQUEST, request_id)
    return None if row is None else RequestView.from_row(row)

"""The pure projector: a domain event becomes a few writes to the read models.

No I/O here. ``project(event)`` says what an event means for the read models; ``plan(writes)``
groups a batch's writes by statement, folds the writes for one request into one row (a single
``INSERT ... ON CONFLICT DO UPDATE`` cannot touch a row twice) and sorts them by key (concurrent
collectors then lock rows in the same order and cannot deadlock). The Postgres adapter applies
the plan; replay uses the very same functions.

Convergence: events arrive out of order and more than once, so every column has a merge rule that
does not depend on order (``merge_request``, mirrored by the SQL in ``projections.postgres``):
- ``status`` only advances by rank (``events.status.advances``), a terminal status is final;
- the outcome fields (error code/message, reject reason, finished_at) come with the write that
  made the status terminal and nothing overwrites them;
- ``created_at``/``started_at`` take the earliest value, ``updated_at`` the latest, ``reserved_tokens``
  the largest; every other field is filled once (a late ``InferenceRequested`` still fills in the prompt).
Exactly one outcome per request is guaranteed by the event store (a unique index), not here.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import TypeVar

import msgspec
from msgspec.structs import replace

from events.model import (
    Event,
    InferenceCancelled,
    InferenceCompleted,
    InferenceExpired,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
)
from events.status import advances, status_of


class UpsertRequest(msgspec.Struct, frozen=True, kw_only=True):
    """A partial row of ``inference_requests``; ``None`` means "this event says nothing about it"."""

    request_id: str
    user_id: str
    model: str
    status: str
    updated_at: datetime
    prompt: str | None = None
    max_tokens: int | None = None
    source: str | None = None
    trace_id: str | None = None
    reserved_tokens: int | None = None
    error_code: str | None = None
    error_message: str | None = None
    reject_reason: str | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class RecordResult(msgspec.Struct, frozen=True, kw_only=True):
    """A row of ``inference_results`` (written once per request)."""

    request_id: str
    completion: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    latency_ms: float
    completed_at: datetime
    embedding: list[float] | None = None  # an embed model's answer


class ChargeUsage(msgspec.Struct, frozen=True, kw_only=True):
    """A row of the ``token_usage`` ledger; the daily aggregate grows only when the row is new."""

    request_id: str
    user_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    occurred_at: datetime


Write = UpsertRequest | RecordResult | ChargeUsage


def invalid_reason(event: Event) -> str | None:
    """Why an event that decoded cannot be stored (None when it can): checks the store relies on."""
    try:
        uuid.UUID(event.event_id)
    except ValueError:
        return f"event_id {event.event_id[:64]!r} is not a UUID"
    if event.occurred_at.tzinfo is None or event.occurred_at.utcoffset() is None:
        return "occurred_at has no UTC offset"
    return None


def project(event: Event) -> list[Write]:
    """What one event means for the read models."""
    base = UpsertRequest(
        request_id=event.request_id,
        user_id=event.user_id,
        model=event.model,
        status=status_of(event),
        updated_at=event.occurred_at,
    )
    match event:
        case InferenceRequested():
            return [
                replace(
                    base,
                    prompt=event.prompt,
                    max_tokens=event.max_tokens,
                    source=event.source,
                    trace_id=event.trace_id,
                    created_at=event.occurred_at,
                )
            ]
        case InferenceStarted():
            return [replace(base, started_at=event.occurred_at, reserved_tokens=event.reserved_tokens)]
        case InferenceCompleted():
            return [
                replace(base, started_at=event.started_at, finished_at=event.occurred_at),
                RecordResult(
                    request_id=event.request_id,
                    completion=event.completion,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    total_tokens=event.total_tokens,
                    latency_ms=event.latency_ms,
                    completed_at=event.occurred_at,
                    embedding=event.embedding,
                ),
                ChargeUsage(
                    request_id=event.request_id,
                    user_id=event.user_id,
                    model=event.model,
                    prompt_tokens=event.prompt_tokens,
                    completion_tokens=event.completion_tokens,
                    total_tokens=event.total_tokens,
                    occurred_at=event.occurred_at,
                ),
            ]
        case InferenceFailed():
            return [
                replace(
                    base,
                    error_code=event.error_code,
                    error_message=event.error_message,
                    started_at=event.started_at,
                    finished_at=event.occurred_at,
                )
            ]
        case InferenceRejected():
            return [
                replace(
                    base,
                    reject_reason=event.reason,
                    error_message=event.detail,
                    finished_at=event.occurred_at,
                )
            ]
        case InferenceCancelled():
            writes: list[Write] = [_ended(base, event, "cancelled")]
            if event.total_tokens > 0:  # only the tokens actually produced before the cancel are charged
                writes.append(
                    ChargeUsage(
                        request_id=event.request_id,
                        user_id=event.user_id,
                        model=event.model,
                        prompt_tokens=event.prompt_tokens,
                        completion_tokens=event.completion_tokens,
                        total_tokens=event.total_tokens,
                        occurred_at=event.occurred_at,
                    )
                )
            return writes
        case InferenceExpired():
            return [_ended(base, event, "expired")]  # never charged
    raise TypeError(f"no projection for {type(event).__name__}")


def _ended(base: UpsertRequest, event: InferenceCancelled | InferenceExpired, code: str) -> UpsertRequest:
    """A cancelled or expired request's row: its code and detail as the error, its start when it ran."""
    return replace(
        base,
        error_code=code,
        error_message=event.detail,
        started_at=event.started_at,
        finished_at=event.occurred_at,
    )


_T = TypeVar("_T", int, datetime)


def _least(a: _T | None, b: _T | None) -> _T | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


def _greatest(a: _T | None, b: _T | None) -> _T | None:
    if a is None:
        return b
    if b is None:
        return a
    return max(a, b)


def merge_request(current: UpsertRequest, new: UpsertRequest) -> UpsertRequest:
    """Fold ``new`` into ``current`` by the convergence rules (the SQL upsert does the same)."""
    moves = advances(current.status, new.status)
    # The outcome fields belong to the write that made the status terminal.
    outcome = new if moves else current
    return UpsertRequest(
        request_id=current.request_id,
        user_id=current.user_id,
        model=current.model,
        status=new.status if moves else current.status,
        updated_at=max(current.updated_at, new.updated_at),
        prompt=current.prompt if current.prompt is not None else new.prompt,
        max_tokens=current.max_tokens if current.max_tokens is not None else new.max_tokens,
        source=current.source if current.source is not None else new.source,
        trace_id=current.trace_id if current.trace_id is not None else new.trace_id,
        reserved_tokens=_greatest(current.reserved_tokens, new.reserved_tokens),
        error_code=outcome.error_code,
        error_message=outcome.error_message,
        reject_reason=outcome.reject_reason,
        created_at=_least(current.created_at, new.created_at),
        started_at=_least(current.started_at, new.started_at),
        finished_at=outcome.finished_at,
    )


class BatchPlan(msgspec.Struct, frozen=True, kw_only=True):
    """A batch's writes grouped by statement: at most one row per key, sorted by key."""

    requests: list[UpsertRequest]
    results: list[RecordResult]
    usage: list[ChargeUsage]

    @property
    def empty(self) -> bool:
        return not (self.requests or self.results or self.usage)


def plan(writes: Iterable[Write]) -> BatchPlan:
    requests: dict[str, UpsertRequest] = {}
    results: dict[str, RecordResult] = {}
    usage: dict[str, ChargeUsage] = {}
    for write in writes:
        match write:
            case UpsertRequest():
                seen = requests.get(write.request_id)
                requests[write.request_id] = write if seen is None else merge_request(seen, write)
            case RecordResult():
                results.setdefault(write.request_id, write)  # first wins, as ON CONFLICT DO NOTHING
            case ChargeUsage():
                usage.setdefault(write.request_id, write)
    return BatchPlan(
        requests=[requests[k] for k in sorted(requests)],
        results=[results[k] for k in sorted(results)],
        usage=[usage[k] for k in sorted(usage)],
    )


def plan_events(events: Iterable[Event]) -> BatchPlan:
    return plan(w for e in events for w in project(e))

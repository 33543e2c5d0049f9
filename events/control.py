"""Controlling a request after its submit: cancel and deadlines, as pure decisions. No I/O.

- **Cancel** (``POST /api/v1/inference/{id}/cancel``, or the bus command ``CancelInference`` on the
  owner's own requests routing key, docs/bus.md): a queued request is cancelled by whoever wins the claim
  record atomically (quota.scripts.CANCEL against the worker's RESERVE), so it either never reaches
  Triton or it is already running; a running request has its Triton call cancelled by its worker.
  Exactly one terminal event is published per request: the canceller's when it won while queued, the
  worker's otherwise.
- **Deadlines**: ``deadline_at`` on ``InferenceRequested`` (the submit's ``timeout_s`` from acceptance,
  or the plan's default), bounded by the plan's ``max_timeout_s``; a request still queued at its
  deadline never runs, a running one has its Triton call cancelled at the deadline.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Final, Literal

import msgspec

from events.model import (
    CancelCause,
    InferenceCancelled,
    InferenceExpired,
    InferenceRequested,
    RequestId,
    Stage,
    new_event_id,
    utc_now,
)
from events.request_rules import Rejection

# The longest timeout_s any plan may allow (a plan's max_timeout_s is bounded by it too).
MAX_TIMEOUT_S: Final = 7 * 86_400

CANCELLED_WHILE_QUEUED: Final = "cancelled while queued; it never ran and nothing was charged"
CANCELLED_WHILE_RUNNING: Final = "cancelled while running; its Triton call was cancelled"


class CancelInference(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """The bus command that cancels one of the publisher's own requests.

    Published on the publisher's own requests routing key, ``inference.requested.<model>.<user_id>``;
    only the routing key's user may cancel, and a request of anyone else is left alone (nothing is
    answered: a request id of another tenant is not confirmed to exist).
    """

    request_id: RequestId
    event_id: str | None = None  # the command's own id, for the publisher's logs (optional)


_command_decoder: Final = msgspec.json.Decoder(CancelInference)


def cancel_command(body: bytes) -> CancelInference | None:
    """The body as a cancel command, or None when it is not one (it may still be a request)."""
    if b"CancelInference" not in body:  # cheap: requests never pay for a second decode
        return None
    try:
        return _command_decoder.decode(body)
    except msgspec.DecodeError:
        return None


# What a cancel does, given the request's status as known before trying:
# unknown: 404 (no such request, or another user's); already: it is cancelled (202, idempotent);
# not_cancellable: another terminal state (409); attempt: race the worker for it (quota.scripts.CANCEL).
CancelVerdict = Literal["unknown", "already", "not_cancellable", "attempt"]
TERMINAL_NOT_CANCELLED: Final = frozenset({"completed", "failed", "rejected", "expired"})


def cancel_verdict(status: str | None) -> CancelVerdict:
    if status is None:
        return "unknown"
    if status == "cancelled":
        return "already"
    if status in TERMINAL_NOT_CANCELLED:
        return "not_cancellable"
    return "attempt"


def cancelled(
    *,
    request_id: str,
    user_id: str,
    model: str,
    stage: Stage,
    cause: CancelCause,
    started_at: datetime | None = None,
    correlation_id: str | None = None,
    causation_id: str | None = None,
    traceparent: str | None = None,
    now: datetime | None = None,
) -> InferenceCancelled:
    return InferenceCancelled(
        event_id=new_event_id(),
        occurred_at=now or utc_now(),
        request_id=request_id,
        user_id=user_id,
        model=model,
        correlation_id=correlation_id or request_id,
        causation_id=causation_id,
        traceparent=traceparent,
        stage=stage,
        cause=cause,
        started_at=started_at if stage == "running" else None,
        detail=CANCELLED_WHILE_QUEUED if stage == "queued" else CANCELLED_WHILE_RUNNING,
    )


def expired(
    request: InferenceRequested, *, stage: Stage, started_at: datetime | None = None, now: datetime | None = None
) -> InferenceExpired:
    assert request.deadline_at is not None, "only a request with a deadline expires"
    where = "while queued; it never ran" if stage == "queued" else "while running; its Triton call was cancelled"
    return InferenceExpired(
        event_id=new_event_id(),
        occurred_at=now or utc_now(),
        request_id=request.request_id,
        user_id=request.user_id,
        model=request.model,
        causation_id=request.event_id,
        correlation_id=request.correlation_id or request.request_id,
        traceparent=request.traceparent,
        stage=stage,
        deadline_at=request.deadline_at,
        started_at=started_at if stage == "running" else None,
        detail=f"deadline {request.deadline_at.isoformat()} passed {where}; nothing was charged",
    )


# --- deadlines ---------------------------------------------------------------------------------


def check_timeout(timeout_s: float, max_timeout_s: int, plan: str) -> Rejection | None:
    """A submit's ``timeout_s`` against its plan's bound (> 0 is the schema's rule)."""
    if timeout_s <= 0:
        return Rejection("invalid_request", "timeout_s must be > 0 seconds")
    if timeout_s > max_timeout_s:
        return Rejection(
            "invalid_request", f"timeout_s {timeout_s:g} is over the {plan} plan's max_timeout_s of {max_timeout_s}"
        )
    return None


def deadline_for(accepted_at: datetime, timeout_s: float | None, default_timeout_s: int | None) -> datetime | None:
    """The request's deadline: ``timeout_s`` (checked) from acceptance, else the plan's default, else none."""
    seconds = timeout_s if timeout_s is not None else default_timeout_s
    return None if seconds is None else accepted_at + timedelta(seconds=seconds)


def check_deadline(request: InferenceRequested, max_timeout_s: int, plan: str) -> Rejection | None:
    """A bus request's ``deadline_at``, bounded like a submit's timeout_s: after its ``occurred_at``, and
    at most the plan's ``max_timeout_s`` after it."""
    if request.deadline_at is None:
        return None
    if request.deadline_at.tzinfo is None or request.deadline_at.utcoffset() is None:
        return Rejection("invalid_request", "deadline_at has no UTC offset")
    return check_timeout((request.deadline_at - request.occurred_at).total_seconds(), max_timeout_s, plan)


def with_default_deadline(request: InferenceRequested, default_timeout_s: int | None) -> InferenceRequested:
    """A request without a deadline gets its plan's default one, from its ``occurred_at`` (bus requests;
    the gateway sets it at the submit)."""
    if request.deadline_at is not None or default_timeout_s is None:
        return request
    return msgspec.structs.replace(request, deadline_at=request.occurred_at + timedelta(seconds=default_timeout_s))


def seconds_left(deadline_at: datetime | None, now: datetime) -> float | None:
    """Seconds until the deadline (<= 0: it passed), or None without one."""
    return None if deadline_at is None else (deadline_at - now).total_seconds()


def is_expired(deadline_at: datetime | None, now: datetime) -> bool:
    left = seconds_left(deadline_at, now)
    return left is not None and left <= 0

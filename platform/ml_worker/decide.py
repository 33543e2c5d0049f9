"""The worker's decisions as pure functions: which events to emit, and what to do with the quota.

Nothing here does I/O. The handler (``ml_worker.handler``) asks these functions what to do
and applies the answer: a quota action first, then the confirmed publish, then the ack.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal

import msgspec

from events import control
from events.identity import caused_by, rejection_of
from events.model import (
    CancelCause,
    ErrorCode,
    InferenceCancelled,
    InferenceCompleted,
    InferenceExpired,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
)
from events.request_rules import Rejection, RejectReason, RequestLimits, check_request
from events.topology import DELIVERY_LIMIT
from quota import plans

# Error messages travel in events and HTTP answers: keep them short.
MAX_DETAIL_CHARS: Final = 500


@dataclass(frozen=True)
class Succeeded:
    text: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    embedding: list[float] | None = None  # an embed model's answer


@dataclass(frozen=True)
class TritonFailed:
    error_code: ErrorCode
    message: str


@dataclass(frozen=True)
class Stopped:
    """The Triton call was cancelled before it answered: a cancel was asked for, or the deadline passed."""

    why: Literal["cancelled", "expired"]
    cause: CancelCause = "http"  # cancelled: who asked


TritonOutcome = Succeeded | TritonFailed
RunOutcome = TritonOutcome | Stopped


@dataclass(frozen=True)
class Commit:
    """Charge the actual tokens (idempotent by request_id)."""

    tokens: int


@dataclass(frozen=True)
class Release:
    """Give the reservation back (idempotent by request_id)."""


QuotaAction = Commit | Release | None
Terminal = InferenceCompleted | InferenceFailed | InferenceRejected | InferenceCancelled | InferenceExpired


@dataclass(frozen=True)
class Outcome:
    """The end of a request: the quota action to apply, THEN the terminal event to publish."""

    quota: QuotaAction
    event: Terminal


def truncate(text: str, limit: int = MAX_DETAIL_CHARS) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def envelope(request: InferenceRequested) -> dict[str, Any]:
    """The fields every event caused by ``request`` carries: same stream, causation and trace."""
    return caused_by(request)


def rejected(request: InferenceRequested, reason: RejectReason, detail: str = "") -> InferenceRejected:
    return rejection_of(request, reason, truncate(detail))


def failed(request: InferenceRequested, error_code: ErrorCode, message: str = "") -> InferenceFailed:
    return InferenceFailed(**envelope(request), error_code=error_code, error_message=truncate(message))


def check(request: InferenceRequested, limits: RequestLimits, prompt_tokens: int | None = None) -> Rejection | None:
    """The gateway's rules, applied again: bus publishers are untrusted and nothing invalid reaches Triton.

    ``prompt_tokens``: the prompt counted by the model's tokenizer, for a model with an input limit in tokens.
    (The plan's per-request ceiling is the quota's to apply, with the plan: QuotaService.reserve.)
    """
    return check_request(
        model=request.model,
        prompt=request.prompt,
        max_tokens=request.max_tokens,
        limits=limits,
        prompt_tokens=prompt_tokens,
    )


def validate(
    request: InferenceRequested, limits: RequestLimits, prompt_tokens: int | None = None
) -> InferenceRejected | None:
    """``check`` as the rejection event it leads to."""
    rejection = check(request, limits, prompt_tokens)
    return None if rejection is None else rejected(request, rejection.reason, rejection.message)


def reservation_estimate(request: InferenceRequested, limits: RequestLimits | None = None) -> int:
    """The tokens reserved before Triton is called: an upper bound (see quota.plans.reservation_estimate)."""
    spec = limits.specs.get(request.model) if limits is not None else None
    return plans.reservation_estimate(request.prompt, request.max_tokens, spec)


def started(request: InferenceRequested, *, reserved_tokens: int, worker: str, attempt: int) -> InferenceStarted:
    return InferenceStarted(
        **envelope(request), reserved_tokens=max(reserved_tokens, 0), worker=worker, attempt=attempt
    )


def refused(request: InferenceRequested, rejection: Rejection) -> Outcome:
    """The reservation refused the request (a request rule, the plan's ceiling or a quota limit: the
    quota service words it as the gateway does). Nothing was reserved: no quota action."""
    return Outcome(quota=None, event=rejected(request, rejection.reason, rejection.message))


def cancelled_outcome(
    request: InferenceRequested, *, cause: CancelCause, started_at: datetime | None = None
) -> Outcome:
    """A cancel reached the worker holding the request: it ends cancelled and its reservation is released.
    A non-streaming call produces nothing countable before it answers, so nothing is charged."""
    event = control.cancelled(
        request_id=request.request_id,
        user_id=request.user_id,
        model=request.model,
        stage="running",
        cause=cause,
        started_at=started_at,
        correlation_id=request.correlation_id or request.request_id,
        causation_id=request.event_id,
        traceparent=request.traceparent,
    )
    return Outcome(quota=Release(), event=event)


def expired_outcome(request: InferenceRequested, *, started_at: datetime | None = None) -> Outcome:
    """The deadline passed: queued (``started_at`` None: it never runs) or running (its call was cancelled).
    Never charged: the reservation, if any, is released."""
    stage: Literal["queued", "running"] = "queued" if started_at is None else "running"
    return Outcome(quota=Release(), event=control.expired(request, stage=stage, started_at=started_at))


def expired_before_start(request: InferenceRequested, now: datetime) -> Outcome | None:
    """The request's deadline passed before it was taken: it ends expired, never run (None: it may run)."""
    return expired_outcome(request) if control.is_expired(request.deadline_at, now) else None


def decide_outcome(request: InferenceRequested, result: RunOutcome, started_at: datetime | None = None) -> Outcome:
    """Triton answered (or gave up, or its call was stopped): commit the actual tokens, or release the
    reservation. ``started_at``: when the inference started (the outcome carries it: InferenceStarted may
    not exist)."""
    match result:
        case Stopped(why="cancelled", cause=cause):
            return cancelled_outcome(request, cause=cause, started_at=started_at)
        case Stopped():
            return expired_outcome(request, started_at=started_at or request.occurred_at)
        case Succeeded():
            event = InferenceCompleted(
                **envelope(request),
                started_at=started_at,
                completion=result.text,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                latency_ms=max(result.latency_ms, 0.0),
                embedding=result.embedding,
            )
            return Outcome(quota=Commit(event.total_tokens), event=event)
        case TritonFailed():
            event_failed = msgspec.structs.replace(
                failed(request, result.error_code, result.message), started_at=started_at
            )
            return Outcome(quota=Release(), event=event_failed)


def delivery_limit_outcome(request: InferenceRequested, error: str) -> Outcome:
    """The last allowed delivery failed unexpectedly: the request ends failed, the message goes to the DLQ."""
    message = f"gave up after {DELIVERY_LIMIT + 1} deliveries: {error}"
    return Outcome(quota=Release(), event=failed(request, "delivery_limit_exceeded", message))


def transient_outcome(request: InferenceRequested, count: int, cause: str) -> Outcome | None:
    """A try could not finish for a transient cause (a dependency outage past the in-process retries, or a
    shutdown): None to requeue it (a later delivery may succeed); on the last allowed delivery, where a
    requeue would dead-letter it with no outcome, the failure it ends with, naming the cause."""
    if not is_last_delivery(count):
        return None
    message = f"a transient failure outlasted {DELIVERY_LIMIT + 1} deliveries: {cause}"
    return Outcome(quota=Release(), event=failed(request, "transient_exhausted", message))


# What the last delivery publishes, given the release's answer (quota.ledger.ReleaseResult.outcome):
# released: the request's hold was freed (or it had none), the failure is its outcome; conflict: the id names
# another request, only its publisher hears (``duplicate_request_id``); committed or none: the request had
# already ended (charged, or failed/refused earlier, its outcome kept with the claim): no second outcome, the
# message is dead-lettered and ``mlp dlq replay`` answers it again with the kept one.
LastDeliveryAction = Literal["publish", "answer_publisher", "dead_letter"]


def last_delivery_action(released: str) -> LastDeliveryAction:
    match released:
        case "released":
            return "publish"
        case "conflict":
            return "answer_publisher"
    return "dead_letter"


def delivery_count(headers: Mapping[str, Any]) -> int:
    """How often the message was delivered before (quorum queues set ``x-delivery-count``)."""
    value = headers.get("x-delivery-count", 0)
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0


def is_last_delivery(count: int, limit: int = DELIVERY_LIMIT) -> bool:
    """True when returning the message to the queue would dead-letter it.

    Measured on RabbitMQ 3.10: deliveries carry x-delivery-count 0..limit; the return of the
    one carrying ``limit`` dead-letters the message (reason ``delivery_limit``).
    """
    return count >= limit

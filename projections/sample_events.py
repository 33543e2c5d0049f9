"""Realistic event streams of requests, for the projection benchmark and the tests."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Literal

from events.model import (
    AnyEvent,
    InferenceCancelled,
    InferenceCompleted,
    InferenceExpired,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
    new_event_id,
)

# cancelled: while running (after its Started events); expired: while queued (no Started).
Outcome = Literal["completed", "failed", "rejected", "running", "queued", "cancelled", "expired"]


def request_stream(
    request_id: str,
    *,
    user_id: str = "alice",
    model: str = "basic-model",
    outcome: Outcome = "completed",
    start: datetime | None = None,
    attempts: int = 1,
    tokens: tuple[int, int] = (12, 7),
) -> list[AnyEvent]:
    """The events of one request, in the order they happen (Requested, Started x attempts, outcome)."""
    t = start or datetime.now(UTC)

    def at(ms: int) -> datetime:
        return t + timedelta(milliseconds=ms)

    events: list[AnyEvent] = [
        InferenceRequested(
            event_id=new_event_id(),
            request_id=request_id,
            occurred_at=t,
            user_id=user_id,
            model=model,
            prompt=f"prompt of {request_id}",
            max_tokens=32,
            trace_id=uuid.uuid4().hex,
        )
    ]
    if outcome == "rejected":
        events.append(
            InferenceRejected(
                event_id=new_event_id(),
                request_id=request_id,
                occurred_at=at(1),
                user_id=user_id,
                model=model,
                reason="quota_exceeded",
                detail="daily tokens spent",
            )
        )
        return events
    if outcome == "queued":
        return events
    if outcome == "expired":
        events.append(
            InferenceExpired(
                event_id=new_event_id(),
                request_id=request_id,
                occurred_at=at(5),
                user_id=user_id,
                model=model,
                stage="queued",
                deadline_at=at(5),
                detail="deadline passed while queued",
            )
        )
        return events
    for attempt in range(1, attempts + 1):
        events.append(
            InferenceStarted(
                event_id=new_event_id(),
                request_id=request_id,
                occurred_at=at(10 * attempt),
                user_id=user_id,
                model=model,
                worker=f"worker-{attempt}",
                attempt=attempt,
                reserved_tokens=32 + attempt,
            )
        )
    if outcome == "completed":
        events.append(
            InferenceCompleted(
                event_id=new_event_id(),
                request_id=request_id,
                occurred_at=at(100),
                user_id=user_id,
                model=model,
                completion=f"completion of {request_id}",
                prompt_tokens=tokens[0],
                completion_tokens=tokens[1],
                latency_ms=88.25,
            )
        )
    elif outcome == "failed":
        events.append(
            InferenceFailed(
                event_id=new_event_id(),
                request_id=request_id,
                occurred_at=at(100),
                user_id=user_id,
                model=model,
                error_code="triton_timeout",
                error_message="no answer within 10s",
            )
        )
    elif outcome == "cancelled":
        events.append(
            InferenceCancelled(
                event_id=new_event_id(),
                request_id=request_id,
                occurred_at=at(100),
                user_id=user_id,
                model=model,
                stage="running",
                cause="http",
                started_at=at(10),
                detail="cancelled while running",
            )
        )
    return events


def synthetic_stream(requests: int, seed: int = 7, users: int = 50) -> list[AnyEvent]:
    """``requests`` completed requests (Requested, Started, Completed each), shuffled."""
    rng = random.Random(seed)
    start = datetime.now(UTC)
    events: list[AnyEvent] = []
    for n in range(requests):
        # A platform-style (canonical) UUID: an id any publisher may name (docs/bus.md, "Request identity").
        rid = str(uuid.uuid4())
        events += request_stream(rid, user_id=f"user-{n % users}", start=start + timedelta(milliseconds=n))
    rng.shuffle(events)
    return events

"""Request status as a pure function of events: the lifecycle and its ordering."""

from __future__ import annotations

from typing import Final, Literal

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

Status = Literal["queued", "running", "completed", "failed", "rejected", "cancelled", "expired"]
TERMINAL_STATUSES: Final[frozenset[str]] = frozenset({"completed", "failed", "rejected", "cancelled", "expired"})

# A status only ever moves to a higher rank: events may arrive out of order, and a
# terminal state is never overwritten (the first terminal event wins).
STATUS_RANK: Final[dict[str, int]] = {
    "queued": 0,
    "running": 1,
    "completed": 2,
    "failed": 2,
    "rejected": 2,
    "cancelled": 2,
    "expired": 2,
}


def status_of(event: Event) -> Status:
    match event:
        case InferenceRequested():
            return "queued"
        case InferenceStarted():
            return "running"
        case InferenceCompleted():
            return "completed"
        case InferenceFailed():
            return "failed"
        case InferenceRejected():
            return "rejected"
        case InferenceCancelled():
            return "cancelled"
        case InferenceExpired():
            return "expired"
    raise TypeError(f"not a domain event: {type(event).__name__}")


def advances(current: str | None, new: str) -> bool:
    """True when moving from ``current`` to ``new`` is progress (never leaves a terminal state)."""
    if current is None:
        return True
    if current in TERMINAL_STATUSES:
        return False
    return STATUS_RANK[new] > STATUS_RANK[current]

"""The pure rules of webhooks: what may be subscribed, the retry schedule and a delivery's next state."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final, Literal

from events.model import TERMINAL_EVENTS, Event
from mlp.backoff import Backoff

DeliveryState = Literal["pending", "delivered", "failed"]
DELIVERY_STATES: Final = ("pending", "delivered", "failed")

# The event types a webhook can receive: the outcomes (the terminal events of events.model, whatever
# types that set grows to), by their wire names (the union's tags).
DELIVERED_TYPES: Final[tuple[str, ...]] = tuple(t.__name__ for t in TERMINAL_EVENTS)


def is_delivered(event: Event) -> bool:
    return isinstance(event, TERMINAL_EVENTS)


def unknown_types(requested: list[str]) -> list[str]:
    return [t for t in requested if t not in DELIVERED_TYPES]


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Retry a failed attempt after ``backoff.delay(attempts - 1)`` until ``window`` after the delivery was enqueued."""

    backoff: Backoff
    window: timedelta


@dataclass(frozen=True, slots=True)
class Outcome:
    state: DeliveryState
    next_attempt_at: datetime | None  # when pending


def after_attempt(*, ok: bool, attempts: int, created_at: datetime, now: datetime, policy: RetryPolicy) -> Outcome:
    """A delivery's state after its ``attempts``-th attempt: delivered on a 2xx; else pending with the next
    attempt after a jittered exponential delay, or failed once the retry window since creation is spent.
    The last retry falls at the window's end, so a target is tried for the whole window, never less."""
    if ok:
        return Outcome("delivered", None)
    window_end = created_at + policy.window
    if now >= window_end:
        return Outcome("failed", None)
    next_at = now + timedelta(seconds=policy.backoff.delay(max(0, attempts - 1)))
    return Outcome("pending", min(next_at, window_end))


def is_success(status_code: int) -> bool:
    return 200 <= status_code < 300

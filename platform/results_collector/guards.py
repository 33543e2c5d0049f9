"""What the collector refuses or answers beyond projecting: pure decisions, no I/O.

- An event must arrive on its own routing key. Platform services always publish with
  ``routing_key(event)``; a mismatch means an external publisher forged an event (say an
  ``InferenceCompleted`` on a requests key, which topic permissions allow): it is dead-lettered,
  never projected.
- A request for a model no worker serves reaches only the projections queue, so no worker would
  ever answer it. The collector answers it with ``InferenceRejected(unknown_model)``.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from events.model import Event, InferenceRejected, InferenceRequested, new_event_id, utc_now
from events.request_rules import check_model
from events.topology import routing_key


def routing_mismatch(event: Event, delivered_with: str) -> str | None:
    """Why an event may not be projected given its delivery routing key, or None when it may."""
    expected = routing_key(event)
    if delivered_with == expected:
        return None
    return f"{type(event).__name__} arrived on routing key {delivered_with!r}; events travel on {expected!r}"


def unserved_rejections(new_events: Iterable[Event], served_models: Collection[str]) -> list[InferenceRejected]:
    """Rejections for newly stored requests that name a model this platform does not serve."""
    return [
        InferenceRejected(
            event_id=new_event_id(),
            request_id=e.request_id,
            occurred_at=utc_now(),
            correlation_id=e.correlation_id or e.request_id,
            causation_id=e.event_id,
            traceparent=e.traceparent,
            user_id=e.user_id,
            model=e.model,
            reason=unserved.reason,
            detail=unserved.message,
        )
        for e in new_events
        if isinstance(e, InferenceRequested) and (unserved := check_model(e.model, served_models)) is not None
    ]

"""What the collector refuses or answers beyond projecting: pure decisions, no I/O.

- An event must arrive on its own routing key. Platform services always publish with
  ``routing_key(event)``; a mismatch means an external publisher forged an event (say an
  ``InferenceCompleted`` on a requests key, which topic permissions allow): it is dead-lettered,
  never projected.
- A request for a model no worker serves reaches only the projections queue, so no worker would
  ever answer it. The collector answers it with ``InferenceRejected(unknown_model)`` (on the request
  when its claim allows, see ``results_collector.follow_up``).
- An untrusted ``InferenceRequested`` is stored only within the platform's limits and only under a
  request id its user may name (``unstorable_request``): an oversized one is never stored, prompt and
  all; its rejection is (the worker's, or the follow-up's for a model no worker serves).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from events.model import Event, InferenceRejected, InferenceRequested, new_event_id, utc_now
from events.request_rules import (
    Rejection,
    RequestLimits,
    check_bounds,
    check_model,
    check_request_id_for,
    max_body_bytes,
)
from events.topology import routing_key


def routing_mismatch(event: Event, delivered_with: str) -> str | None:
    """Why an event may not be projected given its delivery routing key, or None when it may."""
    expected = routing_key(event)
    if delivered_with == expected:
        return None
    return f"{type(event).__name__} arrived on routing key {delivered_with!r}; events travel on {expected!r}"


def unstorable_request(event: InferenceRequested, body_bytes: int, limits: RequestLimits) -> Rejection | None:
    """Why a request must not be stored as it came (it is answered instead), or None when it may.

    Honest: a request id its user may name (events.request_rules.check_request_id_for; the routing key
    already matched the user). Bounded: the body within ``max_body_bytes`` and the size rules
    (``check_bounds``: the prompt within ``max_prompt_chars``, max_tokens within the limit, no NUL).
    """
    limit = max_body_bytes(limits.max_prompt_chars)
    if body_bytes > limit:
        return Rejection("invalid_request", f"message body has {body_bytes} bytes; the limit is {limit}")
    return check_request_id_for(event.user_id, event.request_id) or check_bounds(
        prompt=event.prompt, max_tokens=event.max_tokens, limits=limits
    )


def rejected_on_request(request: InferenceRequested, rejection: Rejection) -> InferenceRejected:
    """The request's own rejection (its stream, its user), caused by it."""
    return InferenceRejected(
        event_id=new_event_id(),
        request_id=request.request_id,
        occurred_at=utc_now(),
        correlation_id=request.correlation_id or request.request_id,
        causation_id=request.event_id,
        traceparent=request.traceparent,
        user_id=request.user_id,
        model=request.model,
        reason=rejection.reason,
        detail=rejection.message,
    )


def unserved_rejections(new_events: Iterable[Event], served_models: Collection[str]) -> list[InferenceRejected]:
    """Rejections for newly stored requests that name a model this platform does not serve (on each
    request's own stream: the follow-up publishes one only when the request's claim allows)."""
    return [
        rejected_on_request(e, unserved)
        for e in new_events
        if isinstance(e, InferenceRequested) and (unserved := check_model(e.model, served_models)) is not None
    ]

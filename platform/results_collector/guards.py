"""What the collector refuses or answers beyond projecting: pure decisions, no I/O.

- An event must arrive on its own routing key. Platform services always publish with
  ``routing_key(event)``; a mismatch means an external publisher forged an event (say an
  ``InferenceCompleted`` on a requests key, which topic permissions allow): it is dead-lettered,
  never projected.
- An untrusted ``InferenceRequested`` is stored only when a worker will handle it: under a request id
  its user may name, for a served model, within the platform's limits (``unstorable_request``). Any
  other is never stored, prompt and all; its rejection is, when it arrives: the worker's for a served
  model, else the collector's own (``results_collector.follow_up``: a request for a model no worker
  serves reaches only the projections queue, so nobody else would answer it).
"""

from __future__ import annotations

from events.identity import rejection_of
from events.model import Event, InferenceRejected, InferenceRequested
from events.request_rules import (
    Rejection,
    RequestLimits,
    check_model,
    check_request_id_for,
    check_size,
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

    Bounded: the body within ``max_body_bytes``. Honest: a request id its user may name
    (events.request_rules.check_request_id_for; the routing key already matched the user). Served: a
    model of ``limits.models``. Bounded again: the size limits (``check_size``: the prompt within
    ``max_prompt_chars``, max_tokens within the limit). (A prompt the store cannot hold, with a NUL, is
    refused by the store itself: dead-lettered, never stored.)
    """
    limit = max_body_bytes(limits.max_prompt_chars)
    if body_bytes > limit:
        return Rejection("invalid_request", f"message body has {body_bytes} bytes; the limit is {limit}")
    return (
        check_request_id_for(event.user_id, event.request_id)
        or check_model(event.model, limits.models)
        or check_size(model=event.model, prompt=event.prompt, max_tokens=event.max_tokens, limits=limits)
    )


def rejected_on_request(request: InferenceRequested, rejection: Rejection) -> InferenceRejected:
    """The request's own rejection (its stream, its user), caused by it."""
    return rejection_of(request, rejection.reason, rejection.message)

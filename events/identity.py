"""Request identity on the bus: which request a message claims, and where a refusal may be addressed.

The rules (docs/bus.md, "Request identity"; the id rules themselves are in events.request_rules):

- a message on user U's routing key speaks for U only, and may name ``U.<suffix>`` or a platform UUID;
- the first message that names a request id claims it (quota.scripts: owner, event_id, content digest);
- a refusal that must not touch the request it names (a conflict, an id U may not name, an invalid
  message naming a request it does not own) goes to the publisher alone: a fresh id in U's namespace,
  ``U.rejected-<event_id>``, with ``correlation_id`` = the id the message named.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from events.model import InferenceRejected, InferenceRequested, new_event_id, utc_now
from events.request_rules import (
    IDENTIFIER,
    REQUEST_ID,
    RejectReason,
    is_platform_uuid,
    publisher_request_id,
    request_digest,
)


@dataclass(frozen=True, slots=True)
class RequestClaim:
    """What a claim records besides its owner: the claiming message's event_id and content digest.

    A later message naming the same request id is the same request (a redelivery) only when both match.
    """

    event_id: str
    digest: str


def claim_of(request: InferenceRequested) -> RequestClaim:
    return RequestClaim(
        request.event_id,
        request_digest(
            model=request.model, user_id=request.user_id, prompt=request.prompt, max_tokens=request.max_tokens
        ),
    )


def publisher_rejection(
    *,
    user_id: str,
    model: str,
    event_id: str | None,
    named: str | None,
    reason: RejectReason,
    detail: str,
    traceparent: str | None = None,
) -> InferenceRejected:
    """A rejection addressed to the publisher alone (never to the request ``named``).

    ``event_id``: the refused message's; when it is a platform UUID the rejection's stream is
    ``<user_id>.rejected-<event_id>``, the same for every delivery of that message (so one outcome is
    stored); else a new id. ``named``: the request id the message named, carried as ``correlation_id``
    (also the AMQP ``correlation_id``) when it is a well-formed request id.
    """
    suffix = event_id if event_id is not None and is_platform_uuid(event_id) else new_event_id()
    return InferenceRejected(
        event_id=new_event_id(),
        occurred_at=utc_now(),
        request_id=publisher_request_id(user_id, suffix),
        user_id=user_id,
        model=model,
        correlation_id=named if named is not None and REQUEST_ID.fullmatch(named) else None,
        causation_id=event_id if event_id is not None and IDENTIFIER.fullmatch(event_id) else None,
        traceparent=traceparent,
        reason=reason,
        detail=detail,
    )


def duplicate_detail(request_id: str) -> str:
    shown = request_id if len(request_id) <= 64 else request_id[:61] + "..."
    return (
        f"request_id {shown!r} already names another request; this message was not run. Use a new "
        f"request_id (a redelivery is recognised by the same event_id and the same content)"
    )


def duplicate_rejection(request: InferenceRequested) -> InferenceRejected:
    """The answer to a message whose request id is claimed by another request: to its publisher only."""
    return publisher_rejection(
        user_id=request.user_id,
        model=request.model,
        event_id=request.event_id,
        named=request.request_id,
        reason="duplicate_request_id",
        detail=duplicate_detail(request.request_id),
        traceparent=request.traceparent,
    )


def caused_by(request: InferenceRequested) -> dict[str, Any]:
    """The fields every event caused by ``request`` carries: a new event id, now, its stream, causation
    and trace."""
    return {
        "event_id": new_event_id(),
        "occurred_at": utc_now(),
        "request_id": request.request_id,
        "user_id": request.user_id,
        "model": request.model,
        "causation_id": request.event_id,
        "correlation_id": request.correlation_id or request.request_id,
        "traceparent": request.traceparent,
    }


def rejection_of(request: InferenceRequested, reason: RejectReason, detail: str = "") -> InferenceRejected:
    """The request's own rejection: on its stream, to its user, caused by it."""
    return InferenceRejected(**caused_by(request), reason=reason, detail=detail)

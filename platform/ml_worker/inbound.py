"""Reading a message off the requests queue: the strict decode, and the lenient fallback for bad ones.

The bus is untrusted input. A message that is not a valid ``InferenceRequested`` still gets
an ``InferenceRejected`` whenever the publisher can be addressed, so the publisher sees why (the
worker never crashes on it and never drops it silently).

Addressing (docs/bus.md, "Request identity"): only what the broker vouches for, the routing key,
says whose message it is; the body's ``user_id`` never addresses anything. The rejection names the
request the message named only when the publisher may name it (its own namespace, or a platform
UUID) and, for that, the claim must agree (``Invalid.claim``: checked by the handler); otherwise it
goes to a fresh id in the publisher's namespace (``events.identity.publisher_rejection``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from events.control import cancel_command
from events.identity import RequestClaim, publisher_rejection
from events.model import EventDecodeError, InferenceRejected, InferenceRequested, decode_event, utc_now
from events.model import new_event_id as _new_event_id
from events.request_rules import (
    IDENTIFIER,
    MODEL_NAME,
    REQUEST_ID,
    check_request_id_for,
    max_body_bytes,
    may_name,
    message_digest,
)
from ml_worker.decide import truncate
from projections.projector import invalid_reason

__all__ = ["CancelRequest", "Delivery", "Invalid", "InvalidClaim", "max_body_bytes", "parse"]

_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")


class LenientIds(msgspec.Struct):
    """Any JSON object: fields of any type, all optional; checked one by one afterwards. (The body's
    user_id and model are not read: the routing key says whose message it is.)"""

    type: object = None
    event_id: object = None
    request_id: object = None
    correlation_id: object = None
    traceparent: object = None


_lenient_decoder: Final = msgspec.json.Decoder(LenientIds)


@dataclass(frozen=True)
class Delivery:
    """What the worker needs from an AMQP delivery (decoupled from FastStream/aio-pika types)."""

    body: bytes
    routing_key: str
    correlation_id: str | None
    message_id: str | None
    headers: Mapping[str, Any]


@dataclass(frozen=True)
class InvalidClaim:
    """The request an invalid message named, which its rejection may end only if the claim agrees
    (quota ``refuse``): the message claims it as refused unless another request holds it."""

    request_id: str
    user_id: str  # the routing key's
    claim: RequestClaim  # the message's event_id (as far as it has one) and the digest of its bytes


@dataclass(frozen=True)
class Invalid:
    """A message that is not an acceptable request.

    ``rejection``: the answer, None when the publisher cannot be addressed (no user in the routing key,
    or no request id anywhere). With ``claim`` it names the request the message named, and is
    published only when the claim allows; otherwise ``publisher_rejection`` (the same answer on a fresh
    id in the publisher's namespace) is. Without ``claim`` it already is the publisher's.
    """

    detail: str
    rejection: InferenceRejected | None
    publisher_rejection: InferenceRejected | None = None
    claim: InvalidClaim | None = None


@dataclass(frozen=True)
class CancelRequest:
    """A ``CancelInference`` command (events.control): cancel ``request_id`` for the routing key's user.

    Only what the broker vouches for says who asks: the routing key's user (and its model, the request's
    own routing key). Whether the request is that user's is the cancel's to check (quota.scripts.CANCEL).
    """

    request_id: str
    user_id: str
    model: str
    event_id: str | None


def parse(delivery: Delivery, max_body: int) -> InferenceRequested | CancelRequest | Invalid:
    if len(delivery.body) > max_body:
        return invalid(delivery, f"message body has {len(delivery.body)} bytes; the limit is {max_body}")
    command = cancel_command(delivery.body)
    if command is not None:
        key_model, key_user = _routing_key_parts(delivery.routing_key)
        user_id, model = _match(key_user, IDENTIFIER), _match(key_model, MODEL_NAME)
        if user_id is None or model is None:
            return Invalid(detail=f"a CancelInference on routing key {delivery.routing_key!r}", rejection=None)
        event_id = command.event_id if command.event_id and IDENTIFIER.fullmatch(command.event_id) else None
        return CancelRequest(command.request_id, user_id, model, event_id)
    try:
        event = decode_event(delivery.body)
    except EventDecodeError as exc:
        return invalid(delivery, f"not a valid InferenceRequested: {exc}")
    if not isinstance(event, InferenceRequested):
        return invalid(delivery, f"expected InferenceRequested on the requests queue, got {type(event).__name__}")
    key_model, key_user = _routing_key_parts(delivery.routing_key)
    if (key_model, key_user) != (event.model, event.user_id):
        # The routing key is what RabbitMQ's topic permissions check: the body must not claim another user or model.
        return invalid(
            delivery,
            f"routing key {delivery.routing_key!r} does not match the body's model/user_id "
            f"(expected inference.requested.{event.model}.{event.user_id})",
        )
    # What the event store would refuse (the collector could not store it) never runs either.
    unstorable = invalid_reason(event)
    if unstorable is not None:
        return invalid(delivery, unstorable)
    foreign = check_request_id_for(event.user_id, event.request_id)
    if foreign is not None:
        return invalid(delivery, foreign.message)
    return event


def invalid(delivery: Delivery, detail: str) -> Invalid:
    """The message refused with ``detail``, and how its publisher is answered (see the module's doc)."""
    detail = truncate(detail)
    ids = _lenient_ids(delivery.body)
    key_model, key_user = _routing_key_parts(delivery.routing_key)
    user_id = _match(key_user, IDENTIFIER)  # never the body's: only the routing key is vouched for
    model = _match(key_model, MODEL_NAME)
    named = _match(ids.request_id, REQUEST_ID) or _match(delivery.correlation_id, REQUEST_ID)
    if user_id is None or model is None or named is None:
        return Invalid(detail=detail, rejection=None)
    event_id = _match(ids.event_id, IDENTIFIER) or _match(delivery.message_id, IDENTIFIER)
    traceparent = _match(ids.traceparent, _TRACEPARENT)
    to_publisher = publisher_rejection(
        user_id=user_id,
        model=model,
        event_id=event_id,
        named=named,
        reason="invalid_request",
        detail=detail,
        traceparent=traceparent,
    )
    if not may_name(user_id, named):
        return Invalid(detail=detail, rejection=to_publisher, publisher_rejection=to_publisher)
    on_request = InferenceRejected(
        event_id=_new_event_id(),
        occurred_at=utc_now(),
        request_id=named,
        user_id=user_id,
        model=model,
        causation_id=event_id,
        correlation_id=_match(ids.correlation_id, IDENTIFIER) or named,
        traceparent=traceparent,
        reason="invalid_request",
        detail=detail,
    )
    claim = InvalidClaim(named, user_id, RequestClaim(event_id or "", message_digest(delivery.body)))
    return Invalid(detail=detail, rejection=on_request, publisher_rejection=to_publisher, claim=claim)


def _lenient_ids(body: bytes) -> LenientIds:
    try:
        return _lenient_decoder.decode(body)
    except msgspec.DecodeError:
        return LenientIds()


def _routing_key_parts(key: str) -> tuple[str | None, str | None]:
    """``inference.requested.<model>.<user_id>`` -> (model, user_id)."""
    parts = key.split(".")
    if len(parts) == 4 and parts[0] == "inference" and parts[1] == "requested":
        return parts[2], parts[3]
    return None, None


def _match(value: object, pattern: re.Pattern[str]) -> str | None:
    return value if isinstance(value, str) and pattern.fullmatch(value) else None

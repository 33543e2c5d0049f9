"""Reading a message off the requests queue: the strict decode, and the lenient fallback for bad ones.

The bus is untrusted input. A message that is not a valid ``InferenceRequested`` still gets
an ``InferenceRejected`` whenever the ids needed to address one can be found, so the
publisher sees why (the worker never crashes on it and never drops it silently).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import msgspec

from events.model import EventDecodeError, InferenceRejected, InferenceRequested, decode_event, utc_now
from events.model import new_event_id as _new_event_id
from events.request_rules import IDENTIFIER, MODEL_NAME
from ml_worker.decide import truncate

_TRACEPARENT: Final = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
# JSON escapes can take 6 bytes per character; plus room for the envelope.
_BODY_OVERHEAD: Final = 16_384


def max_body_bytes(max_prompt_chars: int) -> int:
    """The largest body a valid request can have; anything bigger is refused before decoding."""
    return max_prompt_chars * 6 + _BODY_OVERHEAD


class LenientIds(msgspec.Struct):
    """Any JSON object: fields of any type, all optional; checked one by one afterwards."""

    type: object = None
    event_id: object = None
    request_id: object = None
    user_id: object = None
    model: object = None
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
class Invalid:
    """A message that is not an acceptable request; ``rejection`` is None when no ids could be found."""

    detail: str
    rejection: InferenceRejected | None


def parse(delivery: Delivery, max_body: int) -> InferenceRequested | Invalid:
    if len(delivery.body) > max_body:
        return invalid(delivery, f"message body has {len(delivery.body)} bytes; the limit is {max_body}")
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
    return event


def invalid(delivery: Delivery, detail: str) -> Invalid:
    return Invalid(detail=truncate(detail), rejection=_rejection(delivery, truncate(detail)))


def _rejection(delivery: Delivery, detail: str) -> InferenceRejected | None:
    ids = _lenient_ids(delivery.body)
    key_model, key_user = _routing_key_parts(delivery.routing_key)
    request_id = _match(ids.request_id, IDENTIFIER) or _match(delivery.correlation_id, IDENTIFIER)
    user_id = _match(ids.user_id, IDENTIFIER) or _match(key_user, IDENTIFIER)
    model = _match(ids.model, MODEL_NAME) or _match(key_model, MODEL_NAME)
    if request_id is None or user_id is None or model is None:
        return None
    cause = _match(ids.event_id, IDENTIFIER) or _match(delivery.message_id, IDENTIFIER)
    return InferenceRejected(
        event_id=_new_event_id(),
        occurred_at=utc_now(),
        request_id=request_id,
        user_id=user_id,
        model=model,
        causation_id=cause,
        correlation_id=_match(ids.correlation_id, IDENTIFIER) or request_id,
        traceparent=_match(ids.traceparent, _TRACEPARENT),
        reason="invalid_request",
        detail=detail,
    )


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

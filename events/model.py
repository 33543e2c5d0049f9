"""The domain events: frozen, keyword-only msgspec Structs under one tagged union.

Wire format: JSON, the tag in the ``type`` field. Schemas evolve by adding fields with
defaults (an old reader ignores unknown fields); a change of meaning is a new event type.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime
from typing import Annotated, Final, Literal

import msgspec

from events.request_rules import (
    IDENTIFIER_PATTERN,
    MIN_MAX_TOKENS,
    MODEL_NAME_PATTERN,
    REQUEST_ID_PATTERN,
    RejectReason,
)

SCHEMA_VERSION: Final = 1

# The alphabets and bounds are the request rules' (events.request_rules).
Identifier = Annotated[str, msgspec.Meta(pattern=IDENTIFIER_PATTERN)]
RequestId = Annotated[str, msgspec.Meta(pattern=REQUEST_ID_PATTERN)]
ModelName = Annotated[str, msgspec.Meta(pattern=MODEL_NAME_PATTERN)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]

ErrorCode = Literal[
    "triton_unavailable",
    "triton_timeout",
    "model_error",
    "invalid_input",
    "poison_message",
    "delivery_limit_exceeded",
    "internal_error",
    # A dependency outage (Redis, Postgres, the broker) outlasted the request's last allowed delivery.
    "transient_exhausted",
]


def new_event_id() -> str:
    """A UUIDv7 (RFC 9562): unique and time-ordered, so ids sort by creation time."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 68) & 0xFFF) << 64  # rand_a (12 bits)
    value |= 0b10 << 62  # variant
    value |= rand & 0x3FFF_FFFF_FFFF_FFFF  # rand_b (62 bits)
    return str(uuid.UUID(int=value))


def utc_now() -> datetime:
    return datetime.now(UTC)


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """The envelope every event carries. ``request_id`` names the stream."""

    event_id: str
    request_id: RequestId
    occurred_at: datetime
    schema_version: int = SCHEMA_VERSION
    correlation_id: str | None = None
    causation_id: str | None = None
    # W3C traceparent of the span that emitted the event (joins the request's trace).
    traceparent: str | None = None
    user_id: Identifier
    model: ModelName


class InferenceRequested(Event, frozen=True, kw_only=True):
    prompt: str
    max_tokens: Annotated[int, msgspec.Meta(ge=MIN_MAX_TOKENS)]
    source: Literal["http", "bus"] = "http"
    # Trace id of the submit, stored with the request so users can open it in Jaeger.
    trace_id: str | None = None
    # When the request expires unless finished (the submit's ``timeout_s`` from acceptance, or the plan's
    # default): a request still queued then never runs, a running one has its Triton call cancelled.
    # None: no deadline. Bus publishers may set it too; the worker bounds it by the plan's max_timeout_s.
    deadline_at: datetime | None = None
    # A one-off webhook target of this request's outcome (an HTTP submit's `webhook_url`, SSRF-checked
    # by the gateway, which also records it for the webhook dispatcher; docs/http.md "Webhooks").
    webhook_url: Annotated[str, msgspec.Meta(max_length=2048)] | None = None  # webhooks.ssrf.MAX_URL_CHARS


class InferenceStarted(Event, frozen=True, kw_only=True):
    worker: str = ""
    attempt: int = 1
    reserved_tokens: NonNegative = 0


class InferenceCompleted(Event, frozen=True, kw_only=True):
    completion: str  # "" for an embedding
    prompt_tokens: NonNegative
    completion_tokens: NonNegative
    latency_ms: Annotated[float, msgspec.Meta(ge=0)]
    # An embed model's answer (events.registry, task "embed"): the vector; None for a generate model.
    embedding: list[float] | None = None
    # When the worker called Triton (InferenceStarted's occurred_at, published only for slow
    # inferences): the read model's started_at for every request. None from publishers before it.
    started_at: datetime | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class InferenceFailed(Event, frozen=True, kw_only=True):
    error_code: ErrorCode
    error_message: str = ""
    started_at: datetime | None = None  # when it was started on Triton; None if it never was


class InferenceRejected(Event, frozen=True, kw_only=True):
    reason: RejectReason
    detail: str = ""


# Where a request was when it was cancelled or expired: still waiting in its queue (never reached
# Triton, nothing charged) or running (its Triton call was cancelled).
Stage = Literal["queued", "running"]
# Who asked for a cancel: the owner over HTTP (or an admin), or the owner by a bus command.
CancelCause = Literal["http", "bus"]


class InferenceCancelled(Event, frozen=True, kw_only=True):
    """The request was cancelled by its owner before it finished (a terminal event)."""

    stage: Stage
    cause: CancelCause = "http"
    started_at: datetime | None = None  # when it started running; None when cancelled while queued
    # The tokens actually produced before the cancel, charged (0 when it never ran, or when the call was
    # cancelled before Triton answered: a non-streaming call produces nothing the worker can count).
    prompt_tokens: NonNegative = 0
    completion_tokens: NonNegative = 0
    detail: str = ""

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


class InferenceExpired(Event, frozen=True, kw_only=True):
    """The request's deadline passed before it finished (a terminal event); never charged."""

    stage: Stage
    deadline_at: datetime
    started_at: datetime | None = None
    # Always 0 today: an expired request is never charged (kept for the outcomes' common shape).
    prompt_tokens: NonNegative = 0
    completion_tokens: NonNegative = 0
    detail: str = ""


AnyEvent = (
    InferenceRequested
    | InferenceStarted
    | InferenceCompleted
    | InferenceFailed
    | InferenceRejected
    | InferenceCancelled
    | InferenceExpired
)
TERMINAL_EVENTS: Final = (InferenceCompleted, InferenceFailed, InferenceRejected, InferenceCancelled, InferenceExpired)


class EventDecodeError(ValueError):
    """A message body that is not a valid event (undecodable, unknown type or invalid)."""


_encoder = msgspec.json.Encoder()
_decoder: msgspec.json.Decoder[AnyEvent] = msgspec.json.Decoder(AnyEvent)


def encode_event(event: Event) -> bytes:
    return _encoder.encode(event)


def decode_event(body: bytes | str) -> AnyEvent:
    try:
        return _decoder.decode(body)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        raise EventDecodeError(str(exc)) from exc

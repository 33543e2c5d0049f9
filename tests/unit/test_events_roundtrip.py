"""The domain events on the wire: round trip, schema evolution, and what does not decode."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TypedDict

import msgspec
import pytest

from events.model import (
    Event,
    EventDecodeError,
    InferenceCompleted,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
    decode_event,
    encode_event,
    new_event_id,
)

T0 = datetime(2025, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


class Envelope(TypedDict):
    request_id: str
    user_id: str
    model: str
    occurred_at: datetime


ENVELOPE = Envelope(request_id="req-1", user_id="alice", model="basic-model", occurred_at=T0)


def every_event() -> list[Event]:
    return [
        InferenceRequested(event_id=new_event_id(), prompt="hi", max_tokens=8, trace_id="abc", **ENVELOPE),
        InferenceStarted(event_id=new_event_id(), worker="w1", attempt=2, reserved_tokens=16, **ENVELOPE),
        InferenceCompleted(
            event_id=new_event_id(),
            completion="hello",
            prompt_tokens=3,
            completion_tokens=5,
            latency_ms=12.5,
            **ENVELOPE,
        ),
        InferenceFailed(event_id=new_event_id(), error_code="triton_timeout", error_message="slow", **ENVELOPE),
        InferenceRejected(event_id=new_event_id(), reason="quota_exceeded", detail="100/100", **ENVELOPE),
    ]


@pytest.mark.parametrize("event", every_event(), ids=lambda e: type(e).__name__)
def test_every_event_round_trips_through_json(event: Event) -> None:
    wire = encode_event(event)
    assert msgspec.json.decode(wire)["type"] == type(event).__name__
    assert decode_event(wire) == event
    assert decode_event(wire.decode()) == event


# A newer writer's InferenceCompleted: one field added with a default, as the schema rules demand.
class InferenceCompletedV2(Event, frozen=True, kw_only=True, tag="InferenceCompleted"):
    completion: str
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float
    cached_tokens: int = 0


class InferenceRequestedV2(Event, frozen=True, kw_only=True, tag="InferenceRequested"):
    prompt: str
    max_tokens: int
    source: str = "http"
    trace_id: str | None = None
    priority: str = "normal"


def test_an_old_reader_decodes_a_newer_event_with_an_added_field() -> None:
    newer = InferenceCompletedV2(
        event_id=new_event_id(),
        completion="hello",
        prompt_tokens=3,
        completion_tokens=5,
        latency_ms=1.0,
        cached_tokens=2,
        schema_version=2,
        **ENVELOPE,
    )
    decoded = decode_event(msgspec.json.encode(newer))
    assert isinstance(decoded, InferenceCompleted)
    assert (decoded.event_id, decoded.completion, decoded.total_tokens) == (newer.event_id, "hello", 8)
    assert decoded.schema_version == 2
    requested = InferenceRequestedV2(
        event_id=new_event_id(),
        prompt="p",
        max_tokens=4,
        priority="high",
        **ENVELOPE,
    )
    old = decode_event(msgspec.json.encode(requested))
    assert isinstance(old, InferenceRequested)
    assert old.prompt == "p"


def test_a_newer_reader_decodes_an_old_event_with_the_default() -> None:
    old = every_event()[2]
    newer = msgspec.json.decode(encode_event(old), type=InferenceCompletedV2)
    assert newer.cached_tokens == 0
    assert newer.completion == "hello"


@pytest.mark.parametrize(
    "body",
    [
        b"\x00\xff not json",
        b"",
        b"[]",
        b'{"type": "InferenceExploded", "event_id": "x"}',
        b'{"type": "InferenceRequested"}',
        # valid JSON, known type, but fails validation: a dot in the user id, negative tokens
        b'{"type":"InferenceRequested","event_id":"e","request_id":"r","occurred_at":"2025-01-01T00:00:00Z",'
        b'"user_id":"a.b","model":"m","prompt":"p","max_tokens":1}',
        b'{"type":"InferenceCompleted","event_id":"e","request_id":"r","occurred_at":"2025-01-01T00:00:00Z",'
        b'"user_id":"a","model":"m","completion":"c","prompt_tokens":-1,"completion_tokens":1,"latency_ms":1}',
    ],
)
def test_what_is_not_a_valid_event_raises_event_decode_error(body: bytes) -> None:
    with pytest.raises(EventDecodeError):
        decode_event(body)


def test_event_ids_are_unique_and_time_ordered() -> None:
    ids = [new_event_id() for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    # UUIDv7: the first 48 bits are milliseconds, so ids sort by creation time (ties within a ms aside).
    millis = [int(i.replace("-", "")[:12], 16) for i in ids]
    assert millis == sorted(millis)

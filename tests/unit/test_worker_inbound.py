"""Reading requests off the bus: strict decode, and a rejection the publisher can see for bad messages."""

from __future__ import annotations

import msgspec
import pytest

from events.model import InferenceCompleted, InferenceRequested, encode_event, new_event_id, utc_now
from ml_worker.inbound import Delivery, Invalid, max_body_bytes, parse

MAX_BODY = max_body_bytes(1000)


def delivery(body: bytes, routing_key: str = "inference.requested.basic-model.alice", **props: str) -> Delivery:
    return Delivery(
        body=body,
        routing_key=routing_key,
        correlation_id=props.get("correlation_id"),
        message_id=props.get("message_id"),
        headers={},
    )


def valid() -> InferenceRequested:
    return InferenceRequested(
        event_id=new_event_id(),
        request_id="req-1",
        occurred_at=utc_now(),
        user_id="alice",
        model="basic-model",
        prompt="hi",
        max_tokens=4,
    )


def test_a_valid_request_decodes() -> None:
    event = valid()
    assert parse(delivery(encode_event(event)), MAX_BODY) == event


def test_not_json_without_ids_in_the_message_cannot_be_answered() -> None:
    parsed = parse(delivery(b"\xff not json", routing_key="something.else"), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is None


def test_not_json_is_answered_through_the_properties_and_routing_key() -> None:
    parsed = parse(delivery(b"garbage", correlation_id="req-7", message_id="m-1"), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is not None
    assert (parsed.rejection.request_id, parsed.rejection.user_id, parsed.rejection.model) == (
        "req-7",
        "alice",
        "basic-model",
    )
    assert parsed.rejection.reason == "invalid_request"
    assert parsed.rejection.causation_id == "m-1"


def test_a_schema_violation_is_answered_with_the_decode_error() -> None:
    body = msgspec.json.encode(
        {"type": "InferenceRequested", "request_id": "req-2", "user_id": "bob", "model": "basic-model", "prompt": 5}
    )
    parsed = parse(delivery(body), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is not None
    assert parsed.rejection.request_id == "req-2"
    assert parsed.rejection.user_id == "bob"  # the body wins over the routing key
    assert "Expected" in parsed.rejection.detail or "missing" in parsed.rejection.detail.lower()


def test_ids_that_could_not_travel_in_a_routing_key_are_not_used() -> None:
    body = msgspec.json.encode({"request_id": "a.b#c", "user_id": "x y", "model": "m"})
    parsed = parse(delivery(body, routing_key="nope"), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is None


def test_another_event_type_on_the_requests_queue_is_invalid() -> None:
    completed = InferenceCompleted(
        event_id=new_event_id(),
        request_id="req-3",
        occurred_at=utc_now(),
        user_id="alice",
        model="basic-model",
        completion="x",
        prompt_tokens=1,
        completion_tokens=1,
        latency_ms=1.0,
    )
    parsed = parse(delivery(encode_event(completed)), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert "InferenceCompleted" in parsed.detail
    assert parsed.rejection is not None
    assert parsed.rejection.request_id == "req-3"


def test_an_oversized_body_is_refused_before_decoding() -> None:
    event = valid()
    big = msgspec.json.encode({**msgspec.to_builtins(event), "prompt": "x" * (MAX_BODY + 1)})
    parsed = parse(delivery(big), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert "limit" in parsed.detail
    assert parsed.rejection is not None
    assert parsed.rejection.request_id == "req-1"


@pytest.mark.parametrize("body", [b"[]", b"null", b"1", b'"str"', b"{"])
def test_odd_json_never_raises(body: bytes) -> None:
    assert isinstance(parse(delivery(body), MAX_BODY), Invalid)


@pytest.mark.parametrize(
    "routing_key",
    ["inference.requested.basic-model.mallory", "inference.requested.other-model.alice", "inference.requested"],
)
def test_a_body_that_disagrees_with_its_routing_key_is_refused(routing_key: str) -> None:
    # Topic permissions check the routing key: a body claiming another user (or model) must not pass.
    outcome = parse(delivery(encode_event(valid()), routing_key), MAX_BODY)
    assert isinstance(outcome, Invalid)
    assert "routing key" in outcome.detail
    assert outcome.rejection is not None
    assert outcome.rejection.reason == "invalid_request"

"""Reading requests off the bus: strict decode, and a rejection the publisher can see for bad messages.

Addressing (docs/bus.md, "Request identity"): the routing key says whose message it is, never the body;
a rejection names the request the message named only when the publisher may name it (its namespace, or
a UUID, then subject to the claim: ``Invalid.claim``), else a fresh id in the publisher's namespace.
"""

from __future__ import annotations

import msgspec
import pytest

from events.model import InferenceCompleted, InferenceRequested, encode_event, new_event_id, utc_now
from events.request_rules import message_digest
from ml_worker.inbound import Delivery, Invalid, max_body_bytes, parse

MAX_BODY = max_body_bytes(1000)
ALICE_KEY = "inference.requested.basic-model.alice"
BOB_KEY = "inference.requested.basic-model.bob"


def delivery(body: bytes, routing_key: str = ALICE_KEY, **props: str) -> Delivery:
    return Delivery(
        body=body,
        routing_key=routing_key,
        correlation_id=props.get("correlation_id"),
        message_id=props.get("message_id"),
        headers={},
    )


def valid(**changes: object) -> InferenceRequested:
    fields: dict[str, object] = {
        "event_id": new_event_id(),
        "request_id": "alice.req-1",
        "occurred_at": utc_now(),
        "user_id": "alice",
        "model": "basic-model",
        "prompt": "hi",
        "max_tokens": 4,
    }
    fields.update(changes)
    return InferenceRequested(**fields)  # type: ignore[arg-type]


def test_a_valid_request_decodes() -> None:
    event = valid()
    assert parse(delivery(encode_event(event)), MAX_BODY) == event


def test_a_platform_uuid_request_id_decodes() -> None:
    event = valid(request_id=new_event_id())
    assert parse(delivery(encode_event(event)), MAX_BODY) == event


@pytest.mark.parametrize("request_id", ["req-1", "bob.req-1", "ALICE.x", "0190A000-0000-7000-8000-000000000001"])
def test_a_request_id_the_publisher_may_not_name_is_refused_to_the_publisher(request_id: str) -> None:
    event = valid(request_id=request_id)
    parsed = parse(delivery(encode_event(event)), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert "may name" in parsed.detail
    assert parsed.rejection is not None
    assert parsed.claim is None  # nothing to claim: the answer is the publisher's alone
    assert parsed.rejection.request_id == f"alice.rejected-{event.event_id}"  # the same for every delivery
    assert parsed.rejection.correlation_id == request_id
    assert parsed.rejection.user_id == "alice"
    assert parsed.rejection.reason == "invalid_request"


def test_not_json_without_ids_in_the_message_cannot_be_answered() -> None:
    parsed = parse(delivery(b"\xff not json", routing_key="something.else"), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is None


def test_not_json_is_answered_through_the_properties_and_routing_key() -> None:
    parsed = parse(delivery(b"garbage", correlation_id="alice.req-7", message_id="m-1"), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is not None
    assert (parsed.rejection.request_id, parsed.rejection.user_id, parsed.rejection.model) == (
        "alice.req-7",
        "alice",
        "basic-model",
    )
    assert parsed.rejection.reason == "invalid_request"
    assert parsed.rejection.causation_id == "m-1"
    # Naming the request, it needs the claim's consent: the message claims it as refused.
    assert parsed.claim is not None
    assert (parsed.claim.request_id, parsed.claim.user_id) == ("alice.req-7", "alice")
    assert parsed.claim.claim.event_id == "m-1"
    assert parsed.claim.claim.digest == message_digest(b"garbage")
    assert parsed.publisher_rejection is not None
    assert parsed.publisher_rejection.request_id.startswith("alice.rejected-")
    assert parsed.publisher_rejection.correlation_id == "alice.req-7"


def test_a_schema_violation_is_answered_by_the_routing_key_never_the_body() -> None:
    # The attack: bob's own key, a body claiming alice's request and no prompt.
    body = msgspec.json.encode(
        {"type": "InferenceRequested", "request_id": "alice.req-2", "user_id": "alice", "model": "basic-model"}
    )
    parsed = parse(delivery(body, routing_key=BOB_KEY), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is not None
    assert parsed.rejection.user_id == "bob"  # the routing key wins over the body
    assert parsed.rejection.request_id.startswith("bob.rejected-")  # never alice's request
    assert parsed.rejection.correlation_id == "alice.req-2"
    assert parsed.claim is None
    assert "missing" in parsed.rejection.detail.lower() or "Expected" in parsed.rejection.detail


def test_a_schema_violation_on_the_publishers_own_request_names_it() -> None:
    body = msgspec.json.encode({"type": "InferenceRequested", "request_id": "bob.req-2", "prompt": 5})
    parsed = parse(delivery(body, routing_key=BOB_KEY), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is not None
    assert (parsed.rejection.request_id, parsed.rejection.user_id) == ("bob.req-2", "bob")
    assert parsed.claim is not None
    assert parsed.claim.claim.event_id == ""  # none in the message: the body's digest alone identifies it


def test_a_uuid_request_id_is_named_subject_to_the_claim() -> None:
    rid = new_event_id()
    body = msgspec.json.encode({"type": "InferenceRequested", "request_id": rid, "user_id": "alice"})
    parsed = parse(delivery(body, routing_key=BOB_KEY), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is not None
    assert (parsed.rejection.request_id, parsed.rejection.user_id) == (rid, "bob")
    assert parsed.claim is not None  # another tenant may hold that id: the handler asks the claim first
    assert parsed.publisher_rejection is not None
    assert parsed.publisher_rejection.request_id.startswith("bob.rejected-")


def test_ids_that_could_not_travel_in_a_routing_key_are_not_used() -> None:
    body = msgspec.json.encode({"request_id": "a.b#c", "user_id": "x y", "model": "m"})
    parsed = parse(delivery(body, routing_key="nope"), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert parsed.rejection is None


def test_another_event_type_on_the_requests_queue_is_invalid() -> None:
    completed = InferenceCompleted(
        event_id=new_event_id(),
        request_id="alice.req-3",
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
    assert parsed.rejection.request_id == "alice.req-3"


def test_an_oversized_body_is_refused_before_decoding() -> None:
    event = valid()
    big = msgspec.json.encode({**msgspec.to_builtins(event), "prompt": "x" * (MAX_BODY + 1)})
    parsed = parse(delivery(big), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert "limit" in parsed.detail
    assert parsed.rejection is not None
    assert parsed.rejection.request_id == "alice.req-1"


def test_an_event_id_the_store_would_refuse_is_invalid() -> None:
    parsed = parse(delivery(encode_event(valid(event_id="not-a-uuid"))), MAX_BODY)
    assert isinstance(parsed, Invalid)
    assert "event_id" in parsed.detail


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
    if routing_key == "inference.requested":  # no user in the key: nobody the broker vouches for to answer
        assert outcome.rejection is None
        return
    assert outcome.rejection is not None
    assert outcome.rejection.reason == "invalid_request"
    key_user = routing_key.rsplit(".", 1)[1]
    assert outcome.rejection.user_id == key_user
    if key_user != "alice":  # mallory may not name alice.req-1: answered on mallory's own fresh id
        assert outcome.rejection.request_id.startswith("mallory.rejected-")

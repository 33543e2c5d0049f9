"""Request identity (docs/bus.md): which ids a publisher may name, the claim's content digest, and where a
refusal goes when it must not touch the request it names."""

from __future__ import annotations

import msgspec
import pytest

from events.identity import claim_of, duplicate_rejection, publisher_rejection
from events.model import InferenceRequested, new_event_id, utc_now
from events.request_rules import (
    REQUEST_ID,
    check_request_id_for,
    is_platform_uuid,
    may_name,
    message_digest,
    namespace_owner,
    publisher_request_id,
    request_digest,
)


def requested(**changes: object) -> InferenceRequested:
    fields: dict[str, object] = {
        "event_id": new_event_id(),
        "request_id": "alice.job-1",
        "occurred_at": utc_now(),
        "user_id": "alice",
        "model": "basic-model",
        "prompt": "hello",
        "max_tokens": 8,
    }
    fields.update(changes)
    return InferenceRequested(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("request_id", "owner"),
    [("alice.job-1", "alice"), ("alice.a.b", "alice"), ("user:42@t.x", "user:42@t"), ("alice.", None),
     (".x", None), ("plain", None), ("a b.x", None)],
)  # fmt: skip
def test_a_namespaced_id_names_its_owner_before_the_first_dot(request_id: str, owner: str | None) -> None:
    assert namespace_owner(request_id) == owner


def test_platform_uuids_are_the_canonical_form_new_event_id_makes() -> None:
    assert is_platform_uuid(new_event_id())
    assert is_platform_uuid("550e8400-e29b-41d4-a716-446655440000")  # a v4 is a platform-style UUID too
    assert not is_platform_uuid("550E8400-E29B-41D4-A716-446655440000")  # not canonical: upper case
    assert not is_platform_uuid("550e8400e29b41d4a716446655440000")  # not canonical: no hyphens
    assert not is_platform_uuid("00000000-0000-0000-0000-000000000000")  # the nil UUID has no version


@pytest.mark.parametrize(
    ("user_id", "request_id", "allowed"),
    [
        ("alice", "alice.job-1", True),
        ("alice", new_event_id(), True),
        ("bob", "alice.job-1", False),  # alice's namespace: only alice can create ids in it
        ("alice", "job-1", False),  # no namespace and not a UUID: anyone could collide with it
        ("alice", "alice.x" + "y" * 200, False),  # longer than the alphabet allows
        ("alice", "alice.x y", False),
    ],
)
def test_who_may_name_a_request(user_id: str, request_id: str, allowed: bool) -> None:
    assert may_name(user_id, request_id) is allowed
    rejection = check_request_id_for(user_id, request_id)
    assert (rejection is None) is allowed
    if rejection is not None:
        assert rejection.reason == "invalid_request"
        assert f"{user_id}.<your id>" in rejection.message


def test_request_ids_may_hold_dots_and_200_characters_user_ids_may_not() -> None:
    assert REQUEST_ID.fullmatch("a." + "x" * 198)
    assert not REQUEST_ID.fullmatch("a." + "x" * 199)
    body = msgspec.json.encode(requested(request_id="alice." + "x" * 194))
    assert msgspec.json.decode(body, type=InferenceRequested).request_id.startswith("alice.")


def test_the_digest_is_the_requests_content_only() -> None:
    same = {"model": "m", "user_id": "u", "prompt": "p", "max_tokens": 3}
    assert request_digest(**same) == request_digest(**same)  # type: ignore[arg-type]
    for field, other in (("model", "m2"), ("user_id", "u2"), ("prompt", "p2"), ("max_tokens", 4)):
        assert request_digest(**{**same, field: other}) != request_digest(**same)  # type: ignore[arg-type]
    # Field boundaries are unambiguous (JSON array), and a raw body's digest never equals a request's.
    assert request_digest(model="ab", user_id="c", prompt="p", max_tokens=1) != request_digest(
        model="a", user_id="bc", prompt="p", max_tokens=1
    )
    assert message_digest(b'["m","u","p",3]') != request_digest(**same)  # type: ignore[arg-type]


def test_a_redelivery_has_the_same_claim_and_another_prompt_does_not() -> None:
    first = requested()
    assert claim_of(first) == claim_of(msgspec.structs.replace(first, trace_id="t", source="bus"))
    other = claim_of(msgspec.structs.replace(first, prompt="something else"))
    assert other.event_id == first.event_id
    assert other.digest != claim_of(first).digest


def test_a_duplicate_is_answered_to_the_publisher_never_on_the_claimed_stream() -> None:
    claimed = new_event_id()
    attempt = requested(request_id=claimed, user_id="bob")
    rejection = duplicate_rejection(attempt)
    assert rejection.request_id == publisher_request_id("bob", attempt.event_id) == f"bob.rejected-{attempt.event_id}"
    assert rejection.request_id != claimed
    assert (rejection.user_id, rejection.correlation_id, rejection.causation_id) == ("bob", claimed, attempt.event_id)
    assert rejection.reason == "duplicate_request_id"
    assert may_name("bob", rejection.request_id)  # a stream in bob's own namespace


def test_a_publisher_rejection_without_a_usable_event_id_gets_a_fresh_one() -> None:
    first = publisher_rejection(
        user_id="bob", model="m", event_id="not a uuid", named="x y", reason="invalid_request", detail="d"
    )
    second = publisher_rejection(
        user_id="bob", model="m", event_id=None, named=None, reason="invalid_request", detail="d"
    )
    assert first.request_id.startswith("bob.rejected-")
    assert first.request_id != second.request_id
    assert first.correlation_id is None  # "x y" is no request id: not carried
    assert REQUEST_ID.fullmatch(first.request_id)

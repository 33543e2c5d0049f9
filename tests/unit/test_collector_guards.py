"""The collector's guards: events travel on their own routing key; untrusted requests are stored only within
the platform's limits, for a served model, and under an id their user may name."""

from __future__ import annotations

import msgspec
import pytest

from events.model import InferenceCompleted, InferenceRequested, new_event_id, utc_now
from events.request_rules import Rejection, RequestLimits, max_body_bytes
from events.topology import routing_key
from results_collector.guards import rejected_on_request, routing_mismatch, unstorable_request


def _requested(model: str = "basic-model") -> InferenceRequested:
    return InferenceRequested(
        event_id=new_event_id(),
        request_id="r-1",
        occurred_at=utc_now(),
        user_id="alice",
        model=model,
        prompt="hi",
        max_tokens=4,
    )


def test_an_event_on_its_own_routing_key_passes() -> None:
    event = _requested()
    assert routing_mismatch(event, routing_key(event)) is None


def test_an_outcome_forged_on_a_requests_key_is_refused() -> None:
    forged = InferenceCompleted(
        event_id=new_event_id(),
        request_id="r-1",
        occurred_at=utc_now(),
        user_id="alice",
        model="basic-model",
        completion="forged",
        prompt_tokens=0,
        completion_tokens=0,
        latency_ms=0.0,
    )
    reason = routing_mismatch(forged, "inference.requested.basic-model.alice")
    assert reason is not None
    assert "InferenceCompleted" in reason


LIMITS = RequestLimits(models=frozenset({"basic-model"}), max_prompt_chars=10, max_tokens_limit=8, default_max_tokens=4)


def _untrusted(**changes: object) -> InferenceRequested:
    return msgspec.structs.replace(_requested(), **{"request_id": "alice.r-1", **changes})


def test_a_request_within_the_limits_under_its_users_id_is_stored() -> None:
    assert unstorable_request(_untrusted(), 300, LIMITS) is None
    assert unstorable_request(_untrusted(request_id=new_event_id()), 300, LIMITS) is None
    # Nor a NUL: the store refuses that prompt itself (the event is dead-lettered, never stored).
    assert unstorable_request(_untrusted(prompt="a\x00"), 300, LIMITS) is None


@pytest.mark.parametrize(
    ("changes", "body_bytes", "reason", "needle"),
    [
        ({"prompt": "x" * 11}, 300, "prompt_too_large", "limit is 10"),
        ({"max_tokens": 9}, 300, "max_tokens_too_large", "limit is 8"),
        ({}, max_body_bytes(10) + 1, "invalid_request", "bytes"),
        ({"request_id": "r-1"}, 300, "invalid_request", "may name"),
        ({"request_id": "bob.r-1"}, 300, "invalid_request", "may name"),
        # No worker would answer it: never stored, answered by the collector (results_collector.follow_up).
        ({"model": "nobody-serves"}, 300, "unknown_model", "nobody-serves"),
    ],
)
def test_an_untrusted_request_beyond_the_limits_or_under_a_foreign_id_is_not_stored(
    changes: dict[str, object], body_bytes: int, reason: str, needle: str
) -> None:
    refusal = unstorable_request(_untrusted(**changes), body_bytes, LIMITS)
    assert refusal is not None
    assert refusal.reason == reason
    assert needle in refusal.message


def test_the_rejection_on_the_request_continues_its_stream_without_its_prompt() -> None:
    request = _untrusted(prompt="x" * 11)
    rejection = rejected_on_request(request, Rejection("prompt_too_large", "too long"))
    assert (rejection.request_id, rejection.user_id, rejection.causation_id) == (
        "alice.r-1",
        "alice",
        request.event_id,
    )
    assert "x" * 11 not in msgspec.json.encode(rejection).decode()

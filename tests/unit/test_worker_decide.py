"""The worker's pure decisions: validation, the token estimate, outcome events and the delivery limit."""

from __future__ import annotations

import pytest

from events.model import InferenceCompleted, InferenceFailed, InferenceRejected, InferenceRequested, utc_now
from events.request_rules import Rejection, RequestLimits
from events.topology import DELIVERY_LIMIT
from ml_worker import decide
from ml_worker.decide import Commit, Release, Succeeded, TritonFailed

LIMITS = RequestLimits(
    models=frozenset({"basic-model"}), max_prompt_chars=100, max_tokens_limit=50, default_max_tokens=16
)


def request(**changes: object) -> InferenceRequested:
    fields: dict[str, object] = {
        "event_id": "01900000-0000-7000-8000-000000000001",
        "request_id": "req-1",
        "occurred_at": utc_now(),
        "user_id": "alice",
        "model": "basic-model",
        "prompt": "hello world",
        "max_tokens": 16,
        "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    }
    fields.update(changes)
    return InferenceRequested(**fields)  # type: ignore[arg-type]


def test_a_valid_request_passes() -> None:
    assert decide.validate(request(), LIMITS) is None


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"model": "other-model"}, "unknown_model"),
        ({"prompt": ""}, "invalid_request"),
        ({"prompt": "x" * 101}, "prompt_too_large"),
        ({"max_tokens": 51}, "max_tokens_too_large"),
    ],
)
def test_each_gateway_check_is_repeated_with_its_reason(changes: dict[str, object], reason: str) -> None:
    rejection = decide.validate(request(**changes), LIMITS)
    assert rejection is not None
    assert rejection.reason == reason
    assert rejection.detail


def test_the_boundaries_are_inclusive() -> None:
    assert decide.validate(request(prompt="x" * 100, max_tokens=50), LIMITS) is None
    assert decide.validate(request(max_tokens=1), LIMITS) is None


def test_the_estimate_is_an_upper_bound_of_prompt_and_completion_tokens() -> None:
    assert decide.reservation_estimate(request(prompt="abcdef", max_tokens=10)) == 16


def test_every_emitted_event_continues_the_request_stream() -> None:
    req = request(correlation_id="corr-9")
    started = decide.started(req, reserved_tokens=27, worker="host:1", attempt=2)
    outcome = decide.decide_outcome(req, Succeeded("out", 3, 4, 12.5))
    for event in (started, outcome.event):
        assert event.request_id == req.request_id
        assert event.user_id == req.user_id
        assert event.model == req.model
        assert event.causation_id == req.event_id
        assert event.correlation_id == "corr-9"
        assert event.traceparent == req.traceparent
        assert event.event_id != req.event_id
    assert started.event_id != outcome.event.event_id
    assert (started.reserved_tokens, started.worker, started.attempt) == (27, "host:1", 2)


def test_the_correlation_id_defaults_to_the_request_id() -> None:
    assert decide.started(request(), reserved_tokens=1, worker="w", attempt=1).correlation_id == "req-1"


def test_success_commits_the_actual_tokens_then_completes() -> None:
    outcome = decide.decide_outcome(request(), Succeeded("answer", 5, 7, 3.0))
    assert outcome.quota == Commit(12)
    assert isinstance(outcome.event, InferenceCompleted)
    assert (outcome.event.completion, outcome.event.prompt_tokens, outcome.event.completion_tokens) == ("answer", 5, 7)


def test_a_triton_failure_releases_the_reservation_and_fails_with_its_code() -> None:
    outcome = decide.decide_outcome(request(), TritonFailed("triton_timeout", "no answer"))
    assert outcome.quota == Release()
    assert isinstance(outcome.event, InferenceFailed)
    assert outcome.event.error_code == "triton_timeout"


def test_a_quota_refusal_touches_no_quota_and_rejects() -> None:
    # The quota service words the refusal (as the gateway does); the worker rejects with it on the request.
    refusal = Rejection("quota_exceeded", "daily token quota of 100 tokens on the free plan cannot cover 500")
    outcome = decide.refused(request(), refusal)
    assert outcome.quota is None
    assert isinstance(outcome.event, InferenceRejected)
    assert outcome.event.reason == "quota_exceeded"
    assert outcome.event.detail == refusal.message
    assert outcome.event.request_id == "req-1"


def test_check_is_validate_without_the_event() -> None:
    assert decide.check(request(), LIMITS) is None
    rule = decide.check(request(max_tokens=51), LIMITS)
    validated = decide.validate(request(max_tokens=51), LIMITS)
    assert rule is not None
    assert validated is not None
    assert (rule.reason, rule.message) == (validated.reason, validated.detail)


def test_the_delivery_limit_fails_the_request_and_releases() -> None:
    outcome = decide.delivery_limit_outcome(request(), "RuntimeError: boom")
    assert outcome.quota == Release()
    assert isinstance(outcome.event, InferenceFailed)
    assert outcome.event.error_code == "delivery_limit_exceeded"
    assert "boom" in outcome.event.error_message


def test_a_transient_failure_requeues_until_the_last_delivery_then_fails_the_request_with_its_cause() -> None:
    for count in range(DELIVERY_LIMIT):
        assert decide.transient_outcome(request(), count, "QuotaUnavailable: redis down") is None
    outcome = decide.transient_outcome(request(), DELIVERY_LIMIT, "QuotaUnavailable: redis down")
    assert outcome is not None
    assert outcome.quota == Release()
    assert isinstance(outcome.event, InferenceFailed)
    assert outcome.event.error_code == "transient_exhausted"
    assert "QuotaUnavailable: redis down" in outcome.event.error_message


@pytest.mark.parametrize(
    ("released", "action"),
    [
        ("released", "publish"),  # its hold freed (or none held): the failure is its outcome
        ("conflict", "answer_publisher"),  # the id is another request's
        ("committed", "dead_letter"),  # its result was recorded and charged: never a failure on top
        ("none", "dead_letter"),  # it ended before (failed or refused): its kept outcome stands
    ],
)
def test_the_last_delivery_never_gives_a_charged_or_ended_request_a_second_outcome(released: str, action: str) -> None:
    assert decide.last_delivery_action(released) == action


def test_details_are_bounded() -> None:
    outcome = decide.decide_outcome(request(), TritonFailed("model_error", "x" * 10_000))
    assert isinstance(outcome.event, InferenceFailed)
    assert len(outcome.event.error_message) == decide.MAX_DETAIL_CHARS


@pytest.mark.parametrize(
    ("headers", "count"),
    [({}, 0), ({"x-delivery-count": 3}, 3), ({"x-delivery-count": "2"}, 2), ({"x-delivery-count": "junk"}, 0)],
)
def test_delivery_count_reads_the_quorum_header(headers: dict[str, object], count: int) -> None:
    assert decide.delivery_count(headers) == count


def test_the_last_delivery_is_the_one_carrying_the_limit() -> None:
    # Measured on RabbitMQ 3.10 (tests/integration/test_worker_delivery.py checks it again).
    assert not decide.is_last_delivery(DELIVERY_LIMIT - 1)
    assert decide.is_last_delivery(DELIVERY_LIMIT)

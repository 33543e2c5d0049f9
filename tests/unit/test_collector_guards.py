"""The collector's guards: events travel on their own routing key; unserved models are answered."""

from __future__ import annotations

from events.model import InferenceCompleted, InferenceRequested, new_event_id, utc_now
from events.topology import routing_key
from results_collector.guards import routing_mismatch, unserved_rejections


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


def test_only_requests_for_unserved_models_are_rejected() -> None:
    served, unserved = _requested("basic-model"), _requested("nobody-serves")
    rejections = unserved_rejections([served, unserved], {"basic-model"})
    assert [(r.request_id, r.reason, r.causation_id) for r in rejections] == [
        ("r-1", "unknown_model", unserved.event_id)
    ]
    assert "nobody-serves" in rejections[0].detail

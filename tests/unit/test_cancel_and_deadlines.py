"""Cancel and deadlines as pure decisions (events.control, ml_worker.decide, the projections, the watch)."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from events import control
from events.model import (
    InferenceCancelled,
    InferenceExpired,
    InferenceRequested,
    decode_event,
    encode_event,
    new_event_id,
)
from events.status import STATUS_RANK, TERMINAL_STATUSES, advances, status_of
from events.topology import routing_key
from ml_worker import decide
from ml_worker.cancels import CancelWatch, parse_notice
from ml_worker.decide import Release, Stopped
from ml_worker.inbound import CancelRequest, Delivery, Invalid, max_body_bytes, parse
from projections.projector import ChargeUsage, UpsertRequest, project
from projections.queries import RequestView
from projections.status_cache import cache_update

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def request(**changes: object) -> InferenceRequested:
    fields: dict[str, object] = {
        "event_id": new_event_id(),
        "request_id": "alice.r-1",
        "occurred_at": T0,
        "user_id": "alice",
        "model": "basic-model",
        "prompt": "hello",
        "max_tokens": 8,
    }
    fields.update(changes)
    return InferenceRequested(**fields)  # type: ignore[arg-type]


# --- statuses and events ---------------------------------------------------------------------------


def test_cancelled_and_expired_are_terminal_and_final() -> None:
    assert {"cancelled", "expired"} <= TERMINAL_STATUSES
    assert STATUS_RANK["cancelled"] == STATUS_RANK["expired"] == STATUS_RANK["completed"]
    for status in ("queued", "running"):
        assert advances(status, "cancelled")
        assert advances(status, "expired")
    assert not advances("cancelled", "completed")  # the first terminal state wins
    assert not advances("completed", "cancelled")
    assert not advances("expired", "cancelled")


def test_the_new_events_round_trip_and_route_by_their_kind() -> None:
    cancelled = control.cancelled(
        request_id="alice.r-1", user_id="alice", model="basic-model", stage="queued", cause="bus"
    )
    expired = control.expired(request(deadline_at=T0 + timedelta(seconds=5)), stage="running", started_at=T0)
    for event in (cancelled, expired):
        assert decode_event(encode_event(event)) == event
    assert status_of(cancelled) == "cancelled"
    assert status_of(expired) == "expired"
    assert routing_key(cancelled) == "inference.cancelled.basic-model.alice"
    assert routing_key(expired) == "inference.expired.basic-model.alice"
    assert cancelled.started_at is None  # cancelled while queued: it never started
    assert expired.started_at == T0


def test_a_request_without_a_deadline_decodes_as_before_and_one_with_it_keeps_it() -> None:
    old = request()
    body = json.loads(encode_event(old))
    body.pop("deadline_at")
    assert decode_event(json.dumps(body)) == old  # add-only: an old publisher's request has no deadline
    late = request(deadline_at=T0 + timedelta(seconds=30))
    assert decode_event(encode_event(late)) == late


# --- cancel -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (None, "unknown"),
        ("queued", "attempt"),
        ("running", "attempt"),
        ("cancelled", "already"),
        ("completed", "not_cancellable"),
        ("failed", "not_cancellable"),
        ("rejected", "not_cancellable"),
        ("expired", "not_cancellable"),
    ],
)
def test_the_cancel_verdict_by_status(status: str | None, verdict: str) -> None:
    assert control.cancel_verdict(status) == verdict


def test_the_bus_cancel_command_is_told_apart_from_requests() -> None:
    command = control.cancel_command(b'{"type": "CancelInference", "request_id": "alice.r-1"}')
    assert command == control.CancelInference(request_id="alice.r-1")
    assert control.cancel_command(encode_event(request())) is None
    assert control.cancel_command(b'{"type": "CancelInference", "request_id": "not an id!"}') is None
    assert control.cancel_command(b"CancelInference but not JSON") is None


MAX_BODY = max_body_bytes(1000)


def _delivery(body: bytes, key: str) -> Delivery:
    return Delivery(body=body, routing_key=key, correlation_id=None, message_id=None, headers={})


def test_a_bus_cancel_speaks_for_the_routing_keys_user_only() -> None:
    body = b'{"type": "CancelInference", "request_id": "bob.r-1", "user_id": "bob"}'
    parsed = parse(_delivery(body, "inference.requested.basic-model.mallory"), MAX_BODY)
    assert parsed == CancelRequest("bob.r-1", "mallory", "basic-model", None)  # never the body's user
    unaddressed = parse(_delivery(body, "inference.requested.basic-model"), MAX_BODY)
    assert isinstance(unaddressed, Invalid)
    assert unaddressed.rejection is None


def test_the_watch_cancels_the_call_of_a_request_it_holds_only() -> None:
    async def scenario() -> None:
        watch = CancelWatch()
        assert not watch.notify("alice.r-1", "http")  # not held here: another worker's
        with watch.watching("alice.r-1") as held:
            call = asyncio.ensure_future(asyncio.sleep(30))
            held.task = call
            assert watch.notify("alice.r-1", "bus")
            await asyncio.wait({call})
            assert call.cancelled()
            assert (held.cancelled, held.cause) == (True, "bus")
        assert not watch.notify("alice.r-1", "http")  # released when the request is done

    asyncio.run(scenario())


def test_cancel_notices_parse_strictly() -> None:
    assert parse_notice("http alice.r-1") == ("http", "alice.r-1")
    assert parse_notice("bus 0194212e-4c00-7000-8000-000000000001") == ("bus", "0194212e-4c00-7000-8000-000000000001")
    assert parse_notice("alice.r-1") is None
    assert parse_notice("other alice.r-1") is None
    assert parse_notice("http ") is None


# --- deadlines --------------------------------------------------------------------------------------


def test_timeout_s_is_bounded_by_the_plan() -> None:
    assert control.check_timeout(30, 3600, "free") is None
    assert control.check_timeout(3600, 3600, "free") is None
    for bad in (0, -1, 3600.5):
        rejection = control.check_timeout(bad, 3600, "free")
        assert rejection is not None
        assert rejection.reason == "invalid_request"
    over = control.check_timeout(7200, 3600, "free")
    assert over is not None
    assert "max_timeout_s of 3600" in over.message


def test_the_deadline_comes_from_timeout_s_else_the_plans_default() -> None:
    assert control.deadline_for(T0, 2.5, 60) == T0 + timedelta(seconds=2.5)
    assert control.deadline_for(T0, None, 60) == T0 + timedelta(seconds=60)
    assert control.deadline_for(T0, None, None) is None


def test_a_bus_requests_deadline_is_bounded_like_a_submits() -> None:
    assert control.check_deadline(request(), 60, "free") is None
    assert control.check_deadline(request(deadline_at=T0 + timedelta(seconds=60)), 60, "free") is None
    for deadline in (T0, T0 - timedelta(seconds=1), T0 + timedelta(seconds=61)):
        assert control.check_deadline(request(deadline_at=deadline), 60, "free") is not None
    defaulted = control.with_default_deadline(request(), 10)
    assert defaulted.deadline_at == T0 + timedelta(seconds=10)
    kept = request(deadline_at=T0 + timedelta(seconds=3))
    assert control.with_default_deadline(kept, 10) is kept


def test_a_request_past_its_deadline_is_expired_before_it_runs() -> None:
    due = request(deadline_at=T0 + timedelta(seconds=5))
    assert decide.expired_before_start(due, T0 + timedelta(seconds=4)) is None
    assert decide.expired_before_start(request(), T0 + timedelta(days=9)) is None  # no deadline, never expires
    outcome = decide.expired_before_start(due, T0 + timedelta(seconds=5))
    assert outcome is not None
    assert outcome.quota == Release()  # never charged
    assert isinstance(outcome.event, InferenceExpired)
    assert (outcome.event.stage, outcome.event.started_at) == ("queued", None)
    assert outcome.event.causation_id == due.event_id


def test_a_stopped_call_ends_cancelled_or_expired_and_releases_the_reservation() -> None:
    running = request(deadline_at=T0 + timedelta(seconds=5))
    started = T0 + timedelta(seconds=1)
    cancelled = decide.decide_outcome(running, Stopped("cancelled", "bus"), started_at=started)
    assert cancelled.quota == Release()
    assert isinstance(cancelled.event, InferenceCancelled)
    assert (cancelled.event.stage, cancelled.event.cause, cancelled.event.started_at) == ("running", "bus", started)
    assert cancelled.event.total_tokens == 0  # nothing produced that the worker could count: nothing charged
    expired = decide.decide_outcome(running, Stopped("expired"), started_at=started)
    assert expired.quota == Release()
    assert isinstance(expired.event, InferenceExpired)
    assert (expired.event.stage, expired.event.started_at) == ("running", started)


# --- projections --------------------------------------------------------------------------------------


def test_a_cancel_is_projected_as_its_terminal_state_and_charges_only_produced_tokens() -> None:
    event = control.cancelled(
        request_id="alice.r-1", user_id="alice", model="basic-model", stage="running", cause="http", started_at=T0
    )
    writes = project(event)
    assert len(writes) == 1
    row = writes[0]
    assert isinstance(row, UpsertRequest)
    assert (row.status, row.error_code, row.started_at) == ("cancelled", "cancelled", T0)
    produced = msgspec.structs.replace(event, prompt_tokens=3, completion_tokens=2)
    charged = [w for w in project(produced) if isinstance(w, ChargeUsage)]
    assert [(c.total_tokens, c.request_id) for c in charged] == [(5, "alice.r-1")]
    expired = control.expired(request(deadline_at=T0), stage="queued")
    assert [type(w) for w in project(expired)] == [UpsertRequest]  # never charged


def test_the_status_cache_and_the_view_show_a_cancel() -> None:
    event = control.cancelled(
        request_id="alice.r-1", user_id="alice", model="basic-model", stage="queued", cause="http"
    )
    request_id, status, fields = cache_update(event)
    view = RequestView.from_cache(request_id, {**fields, "status": status})
    assert view.status == "cancelled"
    assert view.error is not None
    assert view.error.code == "cancelled"
    assert view.usage is None
    assert view.finished_at == event.occurred_at

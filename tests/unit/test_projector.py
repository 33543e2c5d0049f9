"""The pure projector: what events mean for the read models, and convergence under reordering and duplicates."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

import msgspec
import pytest

from events.model import AnyEvent, InferenceCompleted, InferenceRequested, InferenceStarted, new_event_id
from events.status import STATUS_RANK, TERMINAL_STATUSES, advances
from projections.projector import (
    ChargeUsage,
    RecordResult,
    UpsertRequest,
    invalid_reason,
    merge_request,
    plan,
    plan_events,
    project,
)
from projections.queries import RequestView
from projections.sample_events import Outcome, request_stream
from projections.status_cache import cache_update, format_ts, parse_ts

T0 = datetime(2025, 5, 4, 23, 59, 59, 999000, tzinfo=UTC)


def test_a_completed_request_projects_its_lifecycle_result_and_one_charge() -> None:
    requested, started, completed = request_stream("r1", start=T0, tokens=(12, 7))
    final = plan_events([requested, started, completed])
    assert len(final.requests) == 1
    row = final.requests[0]
    assert (row.status, row.prompt, row.max_tokens, row.reserved_tokens) == ("completed", "prompt of r1", 32, 33)
    assert (row.created_at, row.started_at, row.finished_at) == (
        requested.occurred_at,
        started.occurred_at,
        completed.occurred_at,
    )
    assert row.updated_at == completed.occurred_at
    assert final.results == [
        RecordResult(
            request_id="r1",
            completion="completion of r1",
            prompt_tokens=12,
            completion_tokens=7,
            total_tokens=19,
            latency_ms=88.25,
            completed_at=completed.occurred_at,
        )
    ]
    assert [(u.user_id, u.total_tokens, u.occurred_at) for u in final.usage] == [("alice", 19, completed.occurred_at)]


def test_an_outcome_carries_the_start_when_no_started_event_was_published() -> None:
    requested, started, completed = request_stream("r2", start=T0, tokens=(3, 4))
    assert isinstance(completed, InferenceCompleted)
    with_start = msgspec.structs.replace(completed, started_at=started.occurred_at)
    row = plan_events([requested, with_start]).requests[0]
    assert (row.status, row.started_at, row.finished_at) == ("completed", started.occurred_at, completed.occurred_at)
    # Both, in any order: the earliest start wins.
    later = msgspec.structs.replace(completed, started_at=completed.occurred_at)
    assert plan_events([requested, later, started]).requests[0].started_at == started.occurred_at


def test_failed_and_rejected_carry_their_error_and_charge_nothing() -> None:
    failed = plan_events(request_stream("f", outcome="failed", start=T0))
    assert (failed.requests[0].status, failed.requests[0].error_code) == ("failed", "triton_timeout")
    assert failed.requests[0].error_message == "no answer within 10s"
    assert failed.results == []
    assert failed.usage == []
    rejected = plan_events(request_stream("x", outcome="rejected", start=T0))
    row = rejected.requests[0]
    assert (row.status, row.reject_reason, row.error_message, row.error_code) == (
        "rejected",
        "quota_exceeded",
        "daily tokens spent",
        None,
    )
    assert rejected.usage == []


def _final_state(events: list[AnyEvent]) -> tuple[UpsertRequest, list[RecordResult], list[ChargeUsage]]:
    """Fold events one write at a time, as separate batches would (merge_request mirrors the SQL)."""
    current: UpsertRequest | None = None
    results: dict[str, RecordResult] = {}
    usage: dict[str, ChargeUsage] = {}
    for event in events:
        for write in project(event):
            if isinstance(write, UpsertRequest):
                current = write if current is None else merge_request(current, write)
            elif isinstance(write, RecordResult):
                results.setdefault(write.request_id, write)
            else:
                usage.setdefault(write.request_id, write)
    assert current is not None
    return current, list(results.values()), list(usage.values())


@pytest.mark.parametrize("outcome", ["completed", "failed", "rejected", "running", "queued", "cancelled", "expired"])
def test_every_order_with_duplicates_converges_to_the_same_state(outcome: Outcome) -> None:
    # Two attempts (a redelivered request started twice) and a duplicate of the first event.
    stream = request_stream("r", outcome=outcome, attempts=2, start=T0)
    with_duplicate = [*stream, stream[0]]
    expected = _final_state(stream)
    orders = list(itertools.permutations(with_duplicate))
    assert len(orders) >= 2
    for order in orders:
        assert _final_state(list(order)) == expected
        # ... and as one batch, in that order
        batch = plan_events(order)
        assert batch.requests == [expected[0]]
        assert (batch.results, batch.usage) == (expected[1], expected[2])
    final = expected[0]
    assert final.status == outcome
    assert final.prompt == "prompt of r"  # a late InferenceRequested still fills in
    assert final.created_at == T0
    if outcome in ("completed", "failed", "running"):
        assert final.started_at == stream[1].occurred_at  # the earliest start
        assert final.reserved_tokens == 34  # the largest reservation


def _upsert(event: AnyEvent) -> UpsertRequest:
    write = project(event)[0]
    assert isinstance(write, UpsertRequest)
    return write


def test_a_terminal_state_is_never_overwritten() -> None:
    requested, started, completed = request_stream("r", start=T0)
    done = _final_state([completed])[0]
    for late in (requested, started):
        after = merge_request(done, _upsert(late))
        assert after.status == "completed"
        assert after.finished_at == completed.occurred_at
    failed = request_stream("r", outcome="failed", start=T0)[-1]
    after = merge_request(done, _upsert(failed))
    assert (after.status, after.error_code, after.finished_at) == ("completed", None, completed.occurred_at)


def test_merge_follows_the_status_rank_table() -> None:
    stamp = T0
    for current, new in itertools.product(STATUS_RANK, repeat=2):
        a = UpsertRequest(request_id="r", user_id="u", model="m", status=current, updated_at=stamp)
        b = UpsertRequest(request_id="r", user_id="u", model="m", status=new, updated_at=stamp)
        expected = new if advances(current, new) else current
        assert merge_request(a, b).status == expected
        if current in TERMINAL_STATUSES:
            assert merge_request(a, b).status == current


def test_plan_groups_rows_by_key_sorted_and_one_row_per_request() -> None:
    events = [e for rid in ("c", "a", "b") for e in request_stream(rid, start=T0)]
    batch = plan_events(reversed(events))
    assert [r.request_id for r in batch.requests] == ["a", "b", "c"]
    assert [r.request_id for r in batch.results] == ["a", "b", "c"]
    assert [r.request_id for r in batch.usage] == ["a", "b", "c"]
    assert plan([]).empty


def test_invalid_reason_catches_what_the_store_would_refuse() -> None:
    good = request_stream("r", start=T0)[0]
    assert invalid_reason(good) is None
    bad_id = InferenceStarted(event_id="not-a-uuid", request_id="r", occurred_at=T0, user_id="u", model="m")
    assert invalid_reason(bad_id) is not None
    naive = InferenceStarted(
        event_id=new_event_id(), request_id="r", occurred_at=datetime(2025, 1, 1), user_id="u", model="m"
    )
    assert "offset" in (invalid_reason(naive) or "")


def test_cache_updates_carry_the_documented_fields() -> None:
    requested, _started, completed = request_stream("r", start=T0)
    assert isinstance(requested, InferenceRequested)
    assert isinstance(completed, InferenceCompleted)
    rid, status, fields = cache_update(requested)
    assert (rid, status) == ("r", "queued")
    assert fields["created_at"] == format_ts(T0) == "2025-05-04T23:59:59.999000+00:00"
    assert fields["trace_id"] == requested.trace_id
    _, status, fields = cache_update(completed)
    assert status == "completed"
    assert {k: fields[k] for k in ("completion", "prompt_tokens", "completion_tokens", "total_tokens")} == {
        "completion": "completion of r",
        "prompt_tokens": "12",
        "completion_tokens": "7",
        "total_tokens": "19",
    }
    assert parse_ts(fields["finished_at"]) == completed.occurred_at


def test_timestamps_format_with_a_fixed_width_so_string_order_is_time_order() -> None:
    stamps = [datetime(2025, 1, 1, 0, 0, s, us, tzinfo=UTC) for s in (0, 1) for us in (0, 1, 999_999)]
    texts = [format_ts(s) for s in stamps]
    assert sorted(texts) == texts
    assert {len(t) for t in texts} == {32}
    assert parse_ts("2025-01-01T00:00:00Z") == stamps[0]


def test_request_view_from_cache_parses_every_field() -> None:
    fields = {
        "status": "rejected",
        "user_id": "u",
        "model": "m",
        "created_at": format_ts(T0),
        "finished_at": format_ts(T0),
        "updated_at": format_ts(T0),
        "reason": "quota_exceeded",
        "error_message": "spent",
    }
    view = RequestView.from_cache("r", fields)
    assert (view.status, view.reason, view.created_at) == ("rejected", "quota_exceeded", T0)
    assert view.error is not None
    assert (view.error.code, view.error.message) == ("quota_exceeded", "spent")
    assert view.result is None
    assert view.usage is None
    queued = RequestView.from_cache("q", {"status": "queued", "user_id": "u", "model": "m"})
    assert (queued.status, queued.created_at, queued.error) == ("queued", None, None)

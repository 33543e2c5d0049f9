"""``mlp status``'s verdict (ops.status.assess) from the facts it read: critical problems fail it, warnings
are shown only."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest

from ops.status import (
    ModelState,
    Outcomes,
    ProjectionState,
    QueueState,
    QuotaState,
    ServiceState,
    Status,
    TritonState,
    assess,
    healthy,
    outcomes_of,
    render,
)

AT = datetime(2030, 5, 20, 12, 0, tzinfo=UTC)


def fine() -> Status:
    return Status(
        at=AT,
        services=[
            ServiceState("gateway", "http://gw", True, True, "0.1.0", {"rabbitmq": True, "redis": True}),
            ServiceState("collector", "http://co", True, True, "0.1.0", {"postgres": True}),
        ],
        queues=[
            QueueState("mlp.projections", True, 3, 1),
            QueueState("mlp.requests.basic-model", True, 0, 2),
            QueueState("mlp.projections.dlq", True, 0, 0),
        ],
        projections=ProjectionState(backlog=3, consumers=1, last_stored_age_s=0.5, lag_s=0.02),
        quota=QuotaState(True, "2030-05-20T11:00:00+00:00"),
        triton=TritonState("http://triton", True, [ModelState("basic-model", "READY", "1", 64, [8], 3.5)]),
        outcomes=Outcomes(300, completed=100, failed=2, rejected=5),
    )


def test_an_empty_webhooks_queue_without_a_dispatcher_is_no_problem() -> None:
    # Only a dispatcher binds mlp.webhooks: where none ever ran, nothing waits for one.
    assert assess(replace(fine(), queues=[QueueState("mlp.webhooks", True, 0, 0)])) == []


def test_a_healthy_platform_has_no_problems() -> None:
    status = fine()
    assert assess(status) == []
    assert healthy(assess(status))
    text = render(status, assess(status))
    assert "HEALTHY" in text.splitlines()[0]
    assert "no problems" in text


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda s: replace(s, services=[replace(s.services[0], reachable=False, ready=False, error="refused")]),
            "gateway unreachable at http://gw (refused)",
        ),
        (
            lambda s: replace(s, services=[replace(s.services[1], ready=False, checks={"postgres": False})]),
            "collector not ready (postgres)",
        ),
        (
            lambda s: replace(s, queues=[QueueState("mlp.requests.basic-model", True, 40, 0)]),
            "queue mlp.requests.basic-model has no consumer (40 message(s) waiting)",
        ),
        (
            lambda s: replace(s, queues=[QueueState("mlp.webhooks", True, 7, 0)]),
            "queue mlp.webhooks has no consumer (7 message(s) waiting)",
        ),
        (
            lambda s: replace(s, projections=ProjectionState(120, 0, 45.0, 0.02)),
            "projections stalled: 120 event(s) waiting, last stored 45 s ago",
        ),
        (
            lambda s: replace(s, triton=TritonState("http://triton", True, [ModelState("basic-model", "UNAVAILABLE")])),
            "model basic-model is UNAVAILABLE in Triton",
        ),
        (
            lambda s: replace(s, outcomes=Outcomes(300, completed=90, failed=10)),
            "10.0% of the last 100 outcomes failed",
        ),
        (lambda s: replace(s, database_error="refused"), "Postgres: refused"),
    ],
)
def test_critical_problems_make_it_unhealthy(change: object, problem: str) -> None:
    status = change(fine())  # type: ignore[operator]
    problems = assess(status)
    assert [(p.severity, p.what) for p in problems] == [("critical", problem)]
    assert not healthy(problems)
    assert "UNHEALTHY" in render(status, problems).splitlines()[0]


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda s: replace(s, queues=[QueueState("mlp.projections.dlq", True, 2, 0)]),
            "2 dead-lettered message(s) in mlp.projections.dlq (mlp dlq list)",
        ),
        (
            lambda s: replace(s, projections=ProjectionState(0, 1, 100.0, 45.0)),
            "projection lag 45.0 s (the last projected event)",
        ),
        (
            lambda s: replace(s, quota=QuotaState(True, None, rebuilding=True)),
            "the quota counters are being rebuilt from the ledger",
        ),
        (  # ready on a fallback (mlp.health): the read API without Redis
            lambda s: replace(
                s, services=[ServiceState("read-api", "http://ra", True, True, "0.1.0", {"redis": False})]
            ),
            "read-api degraded (redis down; serving on its fallback)",
        ),
    ],
)
def test_warnings_are_shown_but_keep_it_healthy(change: object, problem: str) -> None:
    problems = assess(change(fine()))  # type: ignore[operator]
    assert [(p.severity, p.what) for p in problems] == [("warning", problem)]
    assert healthy(problems)


def test_a_busy_collector_is_not_stalled_and_a_few_failures_at_low_volume_are_no_problem() -> None:
    busy = replace(fine(), projections=ProjectionState(5000, 2, 0.1, 3.0), outcomes=Outcomes(300, 3, 2, 0))
    assert assess(busy) == []


def test_a_stopped_collector_is_one_stall_not_also_a_queue_without_consumer() -> None:
    stopped = replace(
        fine(),
        queues=[QueueState("mlp.projections", True, 12, 0)],
        projections=ProjectionState(backlog=12, consumers=0, last_stored_age_s=3.0, lag_s=None),
    )
    assert [p.what for p in assess(stopped)] == ["projections stalled: 12 event(s) waiting, last stored 3 s ago"]


def test_an_unreachable_triton_is_one_problem_not_one_per_model() -> None:
    unreachable = TritonState("http://triton", False, [ModelState("basic-model", "UNKNOWN")], "refused")
    down = replace(fine(), triton=unreachable)
    assert [p.what for p in assess(down)] == ["Triton not ready at http://triton (refused)"]


def test_outcomes_are_counted_by_status_with_their_codes() -> None:
    rows: list[dict[str, Any]] = [
        {"type": "InferenceCompleted", "code": None, "n": 7},
        {"type": "InferenceFailed", "code": "triton_timeout", "n": 2},
        {"type": "InferenceRejected", "code": "quota_exceeded", "n": 1},
    ]
    outcomes = outcomes_of(rows, 300)
    assert (outcomes.completed, outcomes.failed, outcomes.rejected, outcomes.total) == (7, 2, 1, 10)
    assert outcomes.error_codes == {"failed:triton_timeout": 2, "rejected:quota_exceeded": 1}
    assert outcomes.failure_ratio == pytest.approx(0.2)
    assert Outcomes(300).failure_ratio is None

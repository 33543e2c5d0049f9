"""``mlp bench``'s verification against the real Postgres: outcomes are read from ``event_store`` in
batches, and an accepted request without a terminal event is reported as lost."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import pytest

from events.model import (
    Event,
    InferenceCompleted,
    InferenceFailed,
    InferenceRequested,
    InferenceStarted,
    new_event_id,
    utc_now,
)
from mlp.settings import Settings
from ops.bench.terminal import BATCH, TerminalTracker
from projections.postgres import store_and_project

pytestmark = pytest.mark.integration

USER = "bench-terminal-test"
MODEL = "basic-model"


@pytest.fixture
async def pool(migrated: Settings) -> AsyncIterator[asyncpg.Pool]:
    created = await asyncpg.create_pool(migrated.postgres_dsn, min_size=1, max_size=2)
    assert created is not None
    try:
        yield created
    finally:
        await created.close()


async def _store(pool: asyncpg.Pool, events: list[Event]) -> None:
    await store_and_project(pool, events)  # the collector's own write


def _envelope(rid: str) -> dict[str, Any]:
    return {"event_id": new_event_id(), "request_id": rid, "occurred_at": utc_now(), "user_id": USER, "model": MODEL}


def _requested(rid: str) -> InferenceRequested:
    return InferenceRequested(**_envelope(rid), prompt="p", max_tokens=4)


def _started(rid: str) -> InferenceStarted:
    return InferenceStarted(**_envelope(rid))


def _completed(rid: str) -> InferenceCompleted:
    return InferenceCompleted(**_envelope(rid), completion="p", prompt_tokens=1, completion_tokens=1, latency_ms=1.0)


def _failed(rid: str) -> InferenceFailed:
    return InferenceFailed(**_envelope(rid), error_code="internal_error")


async def test_terminal_events_are_found_and_the_rest_reported_lost(pool: asyncpg.Pool) -> None:
    completed, failed, running, never_seen = (new_event_id() for _ in range(4))
    await _store(
        pool,
        [_requested(completed), _completed(completed), _failed(failed), _started(running)],
    )
    tracker = TerminalTracker(pool)
    submitted = (utc_now() - timedelta(seconds=2)).timestamp()
    for request_id in (completed, failed, running, never_seen):
        tracker.add(request_id, submitted)
    tracker.add(completed, submitted)  # an Idempotency-Key replay is tracked once

    lost = await tracker.wait_all(grace_s=0.5, interval_s=0.1)

    assert sorted(lost) == sorted([running, never_seen])
    assert tracker.count("InferenceCompleted") == 1
    assert tracker.count("InferenceFailed") == 1
    latencies = tracker.latencies({completed, failed})
    assert len(latencies) == 2
    assert all(latency > 0 for latency in latencies)  # recorded_at is later than the submit time


async def test_more_ids_than_one_batch_are_all_looked_up(pool: asyncpg.Pool) -> None:
    ids = [new_event_id() for _ in range(BATCH + 7)]
    await _store(pool, [_failed(rid) for rid in ids])
    tracker = TerminalTracker(pool)
    for rid in ids:
        tracker.add(rid, utc_now().timestamp())

    assert await tracker.poll(limit=10) == 10  # the progress tick looks up only the oldest
    assert await tracker.wait_all(grace_s=5) == []
    assert len(tracker.done) == len(ids)

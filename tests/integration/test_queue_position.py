"""Queue position's counters in the real Redis, through the real admission and reservation scripts: tickets
in admission order, the watermark moved by the worker's reservation (never back), the pace sampled
between starts (not across an empty queue), and no ticket for a bus request."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as redis

from events.identity import claim_of
from events.model import InferenceRequested, new_event_id
from mlp.settings import Settings
from projections.queue_position import QueuePositions
from projections.status_cache import StatusCache, StatusKeys
from quota.service import QuotaService, QuotaSettings
from tests.integration.test_quota_ledger import Clock

pytestmark = pytest.mark.integration


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2030, 5, 20, 12, 0, tzinfo=UTC))


@pytest.fixture
def quota(pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock) -> QuotaService:
    return QuotaService(pool, client, QuotaSettings.of(migrated), clock)


@pytest.fixture
def cache(client: redis.Redis, migrated: Settings) -> StatusCache:
    return StatusCache(client, StatusKeys(migrated.redis_prefix))


class Queue:
    """One model of its own (a fresh ticket sequence), its requests admitted and taken as the services do."""

    def __init__(self, quota: QuotaService, cache: StatusCache, positions: QueuePositions, clock: Clock) -> None:
        self.model = f"queue-{uuid.uuid4().hex[:8]}"
        self.user = f"u-{uuid.uuid4().hex[:8]}"
        self._quota, self._cache, self._positions, self._clock = quota, cache, positions, clock

    def request(self) -> InferenceRequested:
        return InferenceRequested(
            event_id=new_event_id(),
            request_id=new_event_id(),
            occurred_at=self._clock(),
            user_id=self.user,
            model=self.model,
            prompt="hello",
            max_tokens=8,
        )

    async def admit(self) -> InferenceRequested:
        """The gateway's admission (scripts.ADMIT with the first status entry)."""
        event = self.request()
        admission = await self._quota.admit(
            self.user, 8, queued=self._cache.queued(event), request_id=event.request_id, claim=claim_of(event)
        )
        assert admission.allowed, admission
        return event

    async def take(self, event: InferenceRequested) -> None:
        """The worker's reservation (scripts.RESERVE with the status key)."""
        reservation = await self._quota.reserve(
            event.request_id,
            event.user_id,
            13,
            status_key=self._cache.status_key(event.request_id),
            claim=claim_of(event),
            max_tokens=8,
            count_request=True,
        )
        assert reservation.answer == "run", reservation

    async def standing(self, event: InferenceRequested) -> tuple[int, float | None] | None:
        return await self._positions.standing(self._cache.status_key(event.request_id))


async def test_positions_fall_as_requests_are_taken_and_the_eta_follows_the_measured_pace(
    quota: QuotaService, cache: StatusCache, client: redis.Redis, clock: Clock
) -> None:
    queue = Queue(quota, cache, QueuePositions(client), clock)
    first, second, third = [await queue.admit() for _ in range(3)]
    assert [await queue.standing(e) for e in (first, second, third)] == [(1, None), (2, None), (3, None)]

    await queue.take(first)
    assert [await queue.standing(e) for e in (second, third)] == [(1, None), (2, None)]  # one start: no pace yet
    clock.advance(seconds=4)
    await queue.take(second)
    assert await queue.standing(third) == (1, 4.0)  # 4 s between two starts
    await queue.take(first)  # a redelivery of an earlier ticket never moves the watermark back
    assert await queue.standing(third) == (1, 4.0)

    clock.advance(seconds=2)
    await queue.take(third)  # the EWMA: 0.2 x 2 s + 0.8 x 4 s; the queue is empty now
    clock.advance(seconds=100)  # idle: this gap is not service time
    fourth = await queue.admit()
    assert await queue.standing(fourth) == (1, 3.6)
    await queue.take(fourth)
    fifth = await queue.admit()
    assert await queue.standing(fifth) == (1, 3.6)  # the 100 s after an empty queue were not sampled


async def test_a_bus_request_has_no_place_in_the_queue(
    quota: QuotaService, cache: StatusCache, client: redis.Redis, clock: Clock
) -> None:
    queue = Queue(quota, cache, QueuePositions(client), clock)
    await queue.admit()
    bus = queue.request()
    # The collector writes a bus request's first status (no gateway admission, so no ticket).
    await cache.advance(bus.request_id, "queued", {"user_id": bus.user_id, "model": bus.model})
    assert await queue.standing(bus) is None
    await queue.take(bus)  # the worker takes it: nothing moves
    after = await queue.admit()
    assert await queue.standing(after) == (2, None)

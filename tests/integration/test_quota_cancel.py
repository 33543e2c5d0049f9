"""Cancel against the worker's reservation, on the real Redis and Postgres (quota.scripts.CANCEL).

The cancel and the reservation race on the request's claim record: whichever runs first decides, and
exactly one of them ends the request. A cancel that wins while queued leaves the worker nothing to run
(RESERVE answers DONE with the kept InferenceCancelled); one that finds the request reserved marks it
and tells the worker on the cancel channel.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as redis

from events import control
from events.identity import claim_of
from events.model import InferenceRequested, decode_event, encode_event, new_event_id, utc_now
from ml_worker.cancels import CancelListener, CancelWatch
from mlp.cache import create_redis
from mlp.settings import Settings
from projections.status_cache import StatusCache, StatusKeys
from quota.ledger import CancelResult
from quota.service import QuotaService, QuotaSettings, Reservation
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def keys(migrated: Settings) -> StatusKeys:
    return StatusKeys(migrated.redis_prefix)


@pytest.fixture
def worker_quota(pool: asyncpg.Pool, client: redis.Redis, migrated: Settings) -> QuotaService:
    return QuotaService(pool, client, QuotaSettings.of(migrated))


@pytest.fixture
async def gateway_quota(pool: asyncpg.Pool, migrated: Settings) -> AsyncIterator[QuotaService]:
    """A second process's quota service: its own Redis connections, so the two race for real."""
    other = create_redis(migrated)
    yield QuotaService(pool, other, QuotaSettings.of(migrated))
    await other.aclose()


def _user() -> str:
    return f"c-{uuid.uuid4().hex[:10]}"


def _request(who: str) -> InferenceRequested:
    rid = new_event_id()
    return InferenceRequested(
        event_id=new_event_id(),
        request_id=rid,
        correlation_id=rid,
        occurred_at=utc_now(),
        user_id=who,
        model="basic-model",
        prompt="hello there",
        max_tokens=8,
    )


async def _admit(quota: QuotaService, cache: StatusCache, request: InferenceRequested) -> None:
    """The gateway's admission: the claim ('admitted') and the 'queued' status entry."""
    admission = await quota.admit(
        request.user_id,
        request.max_tokens,
        queued=cache.queued(request),
        request_id=request.request_id,
        claim=claim_of(request),
    )
    assert admission.allowed


async def _reserve(quota: QuotaService, keys: StatusKeys, request: InferenceRequested) -> Reservation:
    return await quota.reserve(
        request.request_id,
        request.user_id,
        len(request.prompt) + request.max_tokens,
        status_key=keys.status(request.request_id),
        claim=claim_of(request),
        max_tokens=request.max_tokens,
        count_request=True,
    )


async def _cancel(quota: QuotaService, keys: StatusKeys, request: InferenceRequested, user: str) -> CancelResult:
    event = control.cancelled(
        request_id=request.request_id, user_id=user, model=request.model, stage="queued", cause="http"
    )
    return await quota.cancel(
        request.request_id,
        user,
        outcome=encode_event(event),
        status_key=keys.status(request.request_id),
        channel=keys.cancel_channel,
    )


async def test_cancel_and_reservation_racing_end_each_request_exactly_once_with_the_quota_conserved(
    worker_quota: QuotaService, gateway_quota: QuotaService, client: redis.Redis, keys: StatusKeys
) -> None:
    who = _user()
    cache = StatusCache(client, keys)
    requests = [_request(who) for _ in range(40)]
    for request in requests:
        await _admit(gateway_quota, cache, request)

    async def race(i: int, request: InferenceRequested) -> tuple[Reservation, CancelResult]:
        reserve = _reserve(worker_quota, keys, request)
        cancel = _cancel(gateway_quota, keys, request, who)
        if i % 2:
            cancelled, reserved = await asyncio.gather(cancel, reserve)
        else:
            reserved, cancelled = await asyncio.gather(reserve, cancel)
        return reserved, cancelled

    # One race at a time (all at once, each service's pipeline would send all of its scripts together,
    # and one of the two would win every race), alternating which side is sent first.
    results = [await race(i, r) for i, r in enumerate(requests)]
    outcomes = set()
    for request, (reserved, cancelled) in zip(requests, results, strict=True):
        outcomes.add(cancelled.outcome)
        if cancelled.outcome == "queued":  # the cancel won: the worker has nothing to run
            assert reserved.answer == "done", reserved
            assert reserved.outcome_event is not None
            assert type(decode_event(reserved.outcome_event)).__name__ == "InferenceCancelled"
        else:  # the reservation won: the request runs, and its redelivery would end it cancelled
            assert cancelled.outcome == "running", cancelled
            assert reserved.answer == "run", reserved
            assert (await _reserve(worker_quota, keys, request)).answer == "cancel"
            ended = control.cancelled(
                request_id=request.request_id, user_id=who, model=request.model, stage="running", cause="http"
            )
            released = await worker_quota.release(
                request.request_id, outcome=encode_event(ended), user_id=who, claim=claim_of(request)
            )
            assert released.outcome == "released"
        again = await _cancel(gateway_quota, keys, request, who)  # idempotent afterwards
        assert again.outcome == "cancelled", again
        assert again.kept is not None
    assert outcomes == {"queued", "running"}, outcomes  # both orders happened
    view = await worker_quota.view(who)
    assert (view.day.used, view.day.reserved) == (0, 0)
    assert view.day.used + view.day.reserved + view.day.remaining == view.day.limit


async def test_another_users_cancel_does_nothing(
    worker_quota: QuotaService, client: redis.Redis, keys: StatusKeys
) -> None:
    who = _user()
    request = _request(who)
    await _admit(worker_quota, StatusCache(client, keys), request)
    assert (await _cancel(worker_quota, keys, request, "mallory")).outcome == "unknown"
    assert (await _reserve(worker_quota, keys, request)).answer == "run"
    assert (await _cancel(worker_quota, keys, request, "mallory")).outcome == "unknown"
    assert (await _reserve(worker_quota, keys, _request("nobody"))).answer == "run"  # unrelated ids unaffected
    unknown = _request(who)  # never admitted, no status: nothing to cancel
    assert (await _cancel(worker_quota, keys, unknown, who)).outcome == "unknown"


async def test_a_request_that_ended_otherwise_is_not_cancellable(
    worker_quota: QuotaService, client: redis.Redis, keys: StatusKeys
) -> None:
    who = _user()
    request = _request(who)
    await _admit(worker_quota, StatusCache(client, keys), request)
    assert (await _reserve(worker_quota, keys, request)).answer == "run"
    await worker_quota.commit(request.request_id, 5, user_id=who)
    ended = await _cancel(worker_quota, keys, request, who)
    assert (ended.outcome, ended.state) == ("ended", "committed")


async def test_a_running_requests_worker_is_told_on_the_cancel_channel(
    worker_quota: QuotaService, client: redis.Redis, keys: StatusKeys
) -> None:
    who = _user()
    request = _request(who)
    await _admit(worker_quota, StatusCache(client, keys), request)
    watch = CancelWatch()
    listener = CancelListener(client, keys.cancel_channel, watch)
    listener.start()
    try:
        await asyncio.wait_for(listener.subscribed.wait(), 10)
        with watch.watching(request.request_id) as watched:
            assert (await _reserve(worker_quota, keys, request)).answer == "run"
            call = asyncio.ensure_future(asyncio.sleep(60))  # the Triton call, as far as the watch knows
            watched.task = call
            assert (await _cancel(worker_quota, keys, request, who)).outcome == "running"

            async def cancelled() -> bool:
                return call.cancelled()

            await eventually(cancelled, "the watched call cancelled", deadline_s=10)
            assert watched.cancelled
            assert watched.cause == "http"
    finally:
        await listener.close()

"""The quota ledger against the real Redis and Postgres: races, redelivery, expiry, rebuild, windows."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as redis

from mlp.cache import create_redis
from mlp.settings import Settings
from quota import store
from quota.ledger import QuotaUnavailable
from quota.plans import Overrides
from quota.service import QuotaService, QuotaSettings
from tests.support.ledger import charge_ledger

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2030, 5, 20, 12, 0, tzinfo=UTC))


@pytest.fixture
def quota(pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock) -> QuotaService:
    return QuotaService(pool, client, QuotaSettings.of(migrated), clock)


def user() -> str:
    return f"u-{uuid.uuid4().hex[:10]}"


async def with_limits(pool: asyncpg.Pool, user_id: str, **limits: int) -> None:
    async with pool.acquire() as conn:
        await store.set_user_quota(
            conn, user_id, plan="free", overrides=Overrides(**limits), clear_overrides=True, default_plan="free"
        )


async def flush_quota_keys(client: redis.Redis, settings: Settings) -> int:
    """What a Redis restart does to our keys (only this run's prefix; never FLUSHALL)."""
    keys = [k async for k in client.scan_iter(match=f"{settings.redis_prefix}quota:*", count=1000)]
    if keys:
        await client.delete(*keys)
    return len(keys)


# --- races ---------------------------------------------------------------------------------------


async def test_200_concurrent_reservations_never_push_a_user_past_the_limit(
    quota: QuotaService, pool: asyncpg.Pool
) -> None:
    who = user()
    await with_limits(pool, who, tokens_per_day=1000, tokens_per_month=10_000)
    ids = [f"race-{who}-{i}" for i in range(200)]

    results = await asyncio.gather(*(quota.reserve(rid, who, 37) for rid in ids))

    granted = [rid for rid, r in zip(ids, results, strict=True) if r.granted]
    refused = [r for r in results if not r.granted]
    assert len(granted) + len(refused) == 200  # every request is decided one way or the other
    assert all(r.limit == "tokens_per_day" for r in refused)
    assert len(granted) == 1000 // 37  # all that fit, and not one more
    assert (await quota.view(who)).day.reserved == 37 * len(granted)

    await asyncio.gather(*(quota.commit(rid, 30) for rid in granted))
    for r, rid in zip(results, ids, strict=True):
        if not r.granted:
            await quota.release(rid)  # harmless for a refused request

    day = (await quota.view(who)).day
    assert (day.used, day.reserved) == (30 * len(granted), 0)
    assert day.used + day.remaining == day.limit == 1000


_CHILD = """
import asyncio, json, sys
from datetime import datetime
from mlp.cache import create_redis
from mlp.settings import Settings
from quota.ledger import EmptyLedgerSource, RedisLedger
from quota.plans import Limits

async def main(prefix, who, now, tag):
    client = create_redis(Settings(redis_prefix=prefix))
    # The parent built the counters: EmptyLedgerSource is never asked.
    ledger = RedisLedger(client, prefix, EmptyLedgerSource(), reservation_ttl_s=300)
    limits = Limits("free", 1000, 10_000, 60, 1024)
    print("ready", flush=True)
    sys.stdin.readline()  # both processes start together
    at = datetime.fromisoformat(now)
    results = await asyncio.gather(
        *(ledger.reserve(f"{tag}-{i}", who, 37, limits, at) for i in range(100))
    )
    await client.aclose()
    print(json.dumps([r.outcome for r in results]), flush=True)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_reservations_from_two_processes_never_exceed_the_limit(
    quota: QuotaService, clock: Clock, migrated: Settings
) -> None:
    who = user()
    await quota.view(who)  # builds the counters before the children start
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'platform'}{os.pathsep}{ROOT}"}
    children = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            _CHILD,
            migrated.redis_prefix,
            who,
            clock.now.isoformat(),
            f"p{n}-{who}",
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
            env=env,
        )
        for n in range(2)
    ]
    for child in children:
        assert child.stdout is not None
        assert (await child.stdout.readline()).strip() == b"ready"
    for child in children:
        assert child.stdin is not None
        child.stdin.write(b"go\n")
        await child.stdin.drain()
    outputs = [await child.communicate() for child in children]
    assert all(child.returncode == 0 for child in children)

    outcomes = [o for out, _ in outputs for o in json.loads(out.decode().strip().splitlines()[-1])]
    assert len(outcomes) == 200
    assert set(outcomes) <= {"granted", "refused"}
    assert outcomes.count("granted") == 1000 // 37
    assert (await quota.view(who)).day.reserved == 37 * outcomes.count("granted")


# --- redelivery and dead workers -----------------------------------------------------------------


async def test_a_redelivered_request_reserves_once_and_is_charged_once(quota: QuotaService) -> None:
    who, rid = user(), f"req-{uuid.uuid4().hex}"

    first = await quota.reserve(rid, who, 500)
    again = await quota.reserve(rid, who, 500)
    assert (first.granted, first.already, first.reserved_tokens) == (True, False, 500)
    assert (again.granted, again.already, again.reserved_tokens) == (True, True, 500)
    assert (await quota.view(who)).day.reserved == 500

    await quota.commit(rid, 120)
    await quota.commit(rid, 120)
    after = await quota.reserve(rid, who, 500)  # redelivered after the commit
    await quota.release(rid)  # a late release changes nothing either

    assert (after.granted, after.already, after.committed) == (True, True, True)
    view = await quota.view(who)
    assert (view.day.used, view.month.used, view.day.reserved) == (120, 120, 0)


async def test_a_dead_workers_reservation_expires_and_the_redelivery_is_charged_once(
    quota: QuotaService, clock: Clock, migrated: Settings
) -> None:
    who, rid = user(), f"req-{uuid.uuid4().hex}"
    assert (await quota.reserve(rid, who, 800)).granted
    assert (await quota.view(who)).day.reserved == 800

    clock.advance(seconds=migrated.reservation_ttl_s)  # the worker died; its hold runs out
    assert (await quota.view(who)).day.reserved == 0

    redelivered = await quota.reserve(rid, who, 800)
    assert (redelivered.granted, redelivered.already) == (True, False)
    await quota.commit(rid, 300)
    await quota.commit(rid, 300)
    view = await quota.view(who)
    assert (view.day.used, view.day.reserved) == (300, 0)


async def test_a_commit_after_the_reservation_expired_still_charges_the_tokens_spent(
    quota: QuotaService, clock: Clock, migrated: Settings
) -> None:
    who, rid = user(), f"req-{uuid.uuid4().hex}"
    assert (await quota.reserve(rid, who, 100)).granted
    clock.advance(seconds=migrated.reservation_ttl_s + 1)  # a slow worker, not a dead one
    await quota.commit(rid, 90)
    unknown = f"req-{uuid.uuid4().hex}"  # never reserved (e.g. its hold was lost): charged to the given user
    await quota.commit(unknown, 10, user_id=who)
    await quota.commit(unknown, 10, user_id=who)
    assert (await quota.view(who)).day.used == 100


# --- rebuild after Redis lost the counters -------------------------------------------------------


async def _insert_usage(pool: asyncpg.Pool, rid: str, who: str, tokens: int, at: datetime) -> None:
    await charge_ledger(pool, [(rid, who, tokens, at)])


async def _insert_request(
    pool: asyncpg.Pool, rid: str, who: str, status: str, reserved: int | None, started: datetime
) -> None:
    await pool.execute(
        "INSERT INTO inference_requests (request_id, user_id, model, status, reserved_tokens, started_at,"
        " updated_at) VALUES ($1, $2, 'basic-model', $3, $4, $5, $5)",
        rid,
        who,
        status,
        reserved,
        started,
    )


async def test_counters_are_rebuilt_exactly_from_the_ledger_after_a_flush(
    quota: QuotaService, pool: asyncpg.Pool, client: redis.Redis, clock: Clock, migrated: Settings
) -> None:
    who, now = user(), clock.now
    ttl = timedelta(seconds=migrated.reservation_ttl_s)
    rid = {name: f"{name}-{who}" for name in ("today1", "today2", "month", "last_month", "open", "stale", "done")}
    await _insert_usage(pool, rid["today1"], who, 111, now - timedelta(hours=1))
    await _insert_usage(pool, rid["today2"], who, 222, now.replace(hour=0, minute=0))
    await _insert_usage(pool, rid["month"], who, 444, now - timedelta(days=10))
    await _insert_usage(pool, rid["last_month"], who, 888, now - timedelta(days=30))
    # running with an open reservation; running but its hold has expired; running but already in the ledger
    await _insert_request(pool, rid["open"], who, "running", 50, now - timedelta(seconds=10))
    await _insert_request(pool, rid["stale"], who, "running", 70, now - ttl - timedelta(seconds=1))
    await _insert_request(pool, rid["done"], who, "running", 90, now - timedelta(seconds=5))
    await _insert_usage(pool, rid["done"], who, 5, now - timedelta(seconds=1))

    await flush_quota_keys(client, migrated)
    assert not await quota.ledger.is_built()

    view = await quota.view(who)  # rebuilds first
    assert (view.day.used, view.month.used, view.day.reserved) == (111 + 222 + 5, 111 + 222 + 444 + 5, 50)

    # A redelivery of a charged request is still known as charged; the open hold commits normally.
    assert (await quota.reserve(rid["today1"], who, 999)).committed
    await quota.commit(rid["open"], 40)
    view = await quota.view(who)
    assert (view.day.used, view.day.reserved) == (111 + 222 + 5 + 40, 0)


async def test_only_one_process_rebuilds_and_nothing_is_admitted_before_it_finishes(
    quota: QuotaService, pool: asyncpg.Pool, client: redis.Redis, clock: Clock, migrated: Settings
) -> None:
    await flush_quota_keys(client, migrated)
    rebuilt = await asyncio.gather(*(quota.ledger.ensure_built(clock.now) for _ in range(10)))
    assert sorted(rebuilt) == [False] * 9 + [True]

    # Another process holds the rebuild lock and has not finished: we wait, then give up (503), never admit.
    await flush_quota_keys(client, migrated)
    await client.set(f"{migrated.redis_prefix}quota:rebuild-lock", "someone-else", px=60_000)
    impatient = QuotaService(pool, client, QuotaSettings.of(migrated), clock, rebuild_timeout_s=0.3)
    with pytest.raises(QuotaUnavailable, match="being rebuilt"):
        await impatient.admit(user(), 10)
    with pytest.raises(QuotaUnavailable):
        await impatient.reserve(f"req-{uuid.uuid4().hex}", user(), 10)
    await client.delete(f"{migrated.redis_prefix}quota:rebuild-lock")  # that process died: its lock is gone
    assert (await impatient.admit(user(), 10)).allowed


async def test_redis_unreachable_is_reported_as_unavailable(pool: asyncpg.Pool, migrated: Settings) -> None:
    broken = migrated.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    dead = create_redis(broken)
    try:
        with pytest.raises(QuotaUnavailable):
            await QuotaService(pool, dead, QuotaSettings.of(broken)).reserve(f"req-{uuid.uuid4().hex}", user(), 10)
    finally:
        await dead.aclose()


async def test_every_worker_operation_reports_a_redis_outage_as_unavailable(
    pool: asyncpg.Pool, migrated: Settings
) -> None:
    # The worker retries QuotaUnavailable in process; it no longer looks at redis-py's own errors.
    broken = migrated.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})
    dead = create_redis(broken)
    quota = QuotaService(pool, dead, QuotaSettings.of(broken))
    rid = f"req-{uuid.uuid4().hex}"
    try:
        with pytest.raises(QuotaUnavailable):
            await quota.commit(rid, 10, user_id=user())
        with pytest.raises(QuotaUnavailable):
            await quota.release(rid)
        with pytest.raises(QuotaUnavailable):
            await quota.view(user())
    finally:
        await dead.aclose()


async def test_postgres_unreachable_is_reported_as_unavailable(client: redis.Redis, migrated: Settings) -> None:
    # Nothing listens on port 1: the pool (min_size=0) connects only when asked, and fails then.
    dead = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/mlp", min_size=0, max_size=1)
    assert dead is not None
    try:
        with pytest.raises(QuotaUnavailable, match="cannot read quota limits"):
            await QuotaService(dead, client, QuotaSettings.of(migrated)).reserve(f"req-{uuid.uuid4().hex}", user(), 10)
    finally:
        await dead.close()


# --- windows ---------------------------------------------------------------------------------------


async def test_usage_moves_to_the_new_day_at_midnight_utc(quota: QuotaService, clock: Clock) -> None:
    who = user()
    clock.now = datetime(2030, 3, 14, 23, 59, 59, 999_000, tzinfo=UTC)
    await quota.reserve(f"a-{who}", who, 100)
    await quota.commit(f"a-{who}", 60)
    await quota.reserve(f"b-{who}", who, 100)  # reserved before midnight ...
    before = await quota.view(who)
    assert (before.day.id, before.day.used, before.month.used, before.day.reserved) == ("2030-03-14", 60, 60, 100)
    assert before.day.resets_at == datetime(2030, 3, 15, tzinfo=UTC)

    clock.advance(milliseconds=1)
    await quota.commit(f"b-{who}", 25)  # ... completed after it: charged to the new day
    after = await quota.view(who)
    assert (after.day.id, after.day.used, after.day.reserved) == ("2030-03-15", 25, 0)
    assert (after.month.id, after.month.used) == ("2030-03", 85)


async def test_a_commit_is_charged_to_the_window_of_its_completion_time(quota: QuotaService, clock: Clock) -> None:
    who = user()
    completed_at = datetime(2030, 3, 14, 23, 59, 59, 999_000, tzinfo=UTC)
    clock.now = completed_at + timedelta(seconds=2)  # committed just after midnight ...
    await quota.commit(f"a-{who}", 60, user_id=who, at=completed_at)  # ... for a completion just before
    clock.now = completed_at
    assert (await quota.view(who)).day.used == 60


async def test_usage_moves_to_the_new_month_at_the_month_boundary(quota: QuotaService, clock: Clock) -> None:
    who = user()
    clock.now = datetime(2030, 12, 31, 23, 59, 59, 999_000, tzinfo=UTC)
    await quota.commit(f"a-{who}", 70, user_id=who)
    assert (await quota.view(who)).month.used == 70
    clock.advance(milliseconds=1)
    view = await quota.view(who)
    assert (view.day.id, view.day.used, view.month.id, view.month.used) == ("2031-01-01", 0, "2031-01", 0)
    assert view.month.resets_at == datetime(2031, 2, 1, tzinfo=UTC)


# --- admission at the gateway ------------------------------------------------------------------------


async def test_admission_enforces_requests_per_minute_with_a_retry_after(
    quota: QuotaService, pool: asyncpg.Pool, clock: Clock
) -> None:
    who = user()
    await with_limits(pool, who, requests_per_minute=3)
    assert [(await quota.admit(who, 10)).allowed for _ in range(3)] == [True, True, True]
    clock.advance(seconds=20)
    refused = await quota.admit(who, 10)
    assert (refused.allowed, refused.limit, refused.retry_after_s) == (False, "requests_per_minute", 40)
    clock.advance(seconds=40)  # the first three leave the sliding window
    assert (await quota.admit(who, 10)).allowed


async def test_admission_refuses_what_cannot_fit_and_says_which_limit(
    quota: QuotaService, pool: asyncpg.Pool, clock: Clock
) -> None:
    who = user()
    await with_limits(pool, who, tokens_per_day=1000, tokens_per_month=5000, max_tokens_per_request=600)
    too_big = await quota.admit(who, 601)
    assert (too_big.allowed, too_big.limit) == (False, "max_tokens_per_request")
    assert "600" in too_big.detail

    await quota.commit(f"a-{who}", 900, user_id=who)
    assert (await quota.admit(who, 100)).allowed
    spent = await quota.admit(who, 101)
    assert (spent.allowed, spent.limit) == (False, "tokens_per_day")
    assert spent.retry_after_s == 12 * 3600  # the clock says 12:00 UTC: midnight is 12 hours away
    assert "daily token quota of 1000" in spent.detail

    await with_limits(pool, who, tokens_per_day=10_000, tokens_per_month=950, max_tokens_per_request=600)
    quota.forget_limits(who)
    month = await quota.admit(who, 100)
    assert (month.allowed, month.limit) == (False, "tokens_per_month")
    assert month.retry_after_s == int((datetime(2030, 6, 1, tzinfo=UTC) - clock.now).total_seconds())


async def test_a_reservation_that_does_not_fit_is_refused_with_the_limit(
    quota: QuotaService, pool: asyncpg.Pool
) -> None:
    who = user()
    await with_limits(pool, who, tokens_per_day=100)
    refused = await quota.reserve(f"a-{who}", who, 101)
    assert (refused.granted, refused.limit, refused.reserved_tokens) == (False, "tokens_per_day", 0)
    assert (await quota.reserve(f"a-{who}", who, 101)).limit == "tokens_per_day"  # the same answer again


async def test_an_unknown_user_gets_the_default_plan(quota: QuotaService, migrated: Settings) -> None:
    view = await quota.view(user())
    assert view.plan == migrated.default_plan == "free"
    assert (view.day.limit, view.month.limit, view.requests_per_minute) == (100_000, 1_000_000, 60)
    assert (view.day.used, view.day.remaining) == (0, 100_000)

"""The quota rebuild after Redis lost the counters, against the real Redis and Postgres: it restores exactly
what was lost, reads as many rows for many charged requests as for few, never writes once its lock is
taken over, and keeps its lock past the lock's TTL while it runs."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
import redis.asyncio as redis

from mlp.settings import Settings
from quota import scripts
from quota.ledger import LedgerSource, RebuildStats, RedisLedger
from quota.plans import Window
from quota.service import QuotaService, QuotaSettings
from quota.store import ChargedRequest, LedgerBatch, PostgresLedgerSource, UsageTotals
from tests.integration.test_quota_ledger import Clock, flush_quota_keys, user, with_limits
from tests.support.ledger import charge_ledger
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


@pytest.fixture
def clock() -> Clock:
    return Clock(datetime(2030, 7, 15, 12, 0, tzinfo=UTC))


@pytest.fixture
def quota(pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock) -> QuotaService:
    return QuotaService(pool, client, QuotaSettings.of(migrated), clock)


async def _charge_many(
    quota: QuotaService, pool: asyncpg.Pool, who: str, n: int, clock: Clock, *, tag: str, spread_h: float = 11.0
) -> None:
    """n requests reserved and committed in Redis by the worker, and their ledger rows written by the collector;
    their completion times spread over the day so far (and the first day of the month for every tenth)."""
    charges = []
    for i in range(n):
        rid = f"{tag}-{who}-{i}"
        at = clock.now - timedelta(hours=spread_h * i / max(1, n))
        if i % 10 == 9:
            at = clock.now.replace(day=1, hour=1)
        tokens = 1 + i % 7
        await quota.reserve(rid, who, 10)
        await quota.commit(rid, tokens, user_id=who, at=at)
        charges.append((rid, who, tokens, at))
    await charge_ledger(pool, charges)


async def _running(pool: asyncpg.Pool, rid: str, who: str, reserved: int, started: datetime) -> None:
    await pool.execute(
        "INSERT INTO inference_requests (request_id, user_id, model, status, reserved_tokens, started_at,"
        " updated_at) VALUES ($1, $2, 'basic-model', 'running', $3, $4, $4)",
        rid,
        who,
        reserved,
        started,
    )


async def _usage(quota: QuotaService, users: list[str]) -> dict[str, tuple[int, int, int]]:
    views = [await quota.view(who) for who in users]
    return {v.user_id: (v.day.used, v.month.used, v.day.reserved) for v in views}


async def _rebuild(quota: QuotaService, client: redis.Redis, migrated: Settings, clock: Clock) -> RebuildStats:
    await flush_quota_keys(client, migrated)
    assert await quota.ledger.ensure_built(clock.now) is True
    assert quota.ledger.last_rebuild is not None
    return quota.ledger.last_rebuild


async def test_a_rebuild_restores_exactly_the_counters_redis_lost(
    quota: QuotaService, pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock
) -> None:
    users = [user() for _ in range(3)]
    for n, who in enumerate(users):
        await with_limits(pool, who, tokens_per_day=10_000_000, tokens_per_month=100_000_000)
        await _charge_many(quota, pool, who, 150 + 50 * n, clock, tag="many")
    # a request of the first user still running, with its hold in Redis and its row in Postgres
    running = f"running-{users[0]}"
    assert (await quota.reserve(running, users[0], 33)).granted
    await _running(pool, running, users[0], 33, clock.now - timedelta(seconds=5))
    before = await _usage(quota, users)
    assert before[users[0]][2] == 33

    stats = await _rebuild(quota, client, migrated, clock)

    assert await _usage(quota, users) == before
    assert stats.open >= 1
    assert stats.totals >= len(users)
    # A redelivery of a charged request is done, not run, and charging it again changes nothing.
    rid = f"many-{users[1]}-3"
    again = await quota.reserve(rid, users[1], 10)
    assert (again.answer, again.committed) == ("done", True)
    await quota.commit(rid, 5, user_id=users[1])
    # The running request's hold commits normally.
    await quota.commit(running, 30, user_id=users[0])
    after = await _usage(quota, users)
    assert after[users[1]] == before[users[1]]
    assert after[users[0]] == (before[users[0]][0] + 30, before[users[0]][1] + 30, 0)


async def test_a_charge_the_rebuild_did_not_see_is_counted_once_and_one_it_saw_not_again(
    quota: QuotaService, pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock
) -> None:
    who = user()
    seen, unseen = f"seen-{who}", f"unseen-{who}"
    # The worker committed both in Redis; Redis lost them before the collector wrote the second's ledger row.
    await charge_ledger(pool, [(seen, who, 40, clock.now)])
    await _rebuild(quota, client, migrated, clock)
    assert (await quota.view(who)).day.used == 40
    await charge_ledger(pool, [(unseen, who, 7, clock.now)])  # after the rebuild's snapshot

    # The collector's follow-up commits: the first was counted by the rebuild, the second was not.
    for _ in range(2):
        await quota.commit(seen, 40, user_id=who)
        await quota.commit(unseen, 7, user_id=who)
    assert (await quota.view(who)).day.used == 47
    # And a redelivery of either is done, never run again.
    assert (await quota.reserve(unseen, who, 10)).answer == "done"
    assert (await quota.view(who)).day.used == 47


async def test_the_rows_a_rebuild_reads_do_not_grow_with_the_charged_requests(
    quota: QuotaService, pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock
) -> None:
    users = [user() for _ in range(3)]
    for who in users:
        await with_limits(pool, who, tokens_per_day=10_000_000, tokens_per_month=100_000_000)
        await _charge_many(quota, pool, who, 10, clock, tag="few")
    few = await _rebuild(quota, client, migrated, clock)
    few_usage = await _usage(quota, users)

    many_rows = []
    for who in users:  # 100 times as many charged requests, written straight to the ledger
        many_rows += [(f"bulk-{who}-{i}", who, 3, clock.now - timedelta(minutes=i % 600)) for i in range(1000)]
    await charge_ledger(pool, many_rows)
    many = await _rebuild(quota, client, migrated, clock)

    assert (many.totals, many.open, many.writes) == (few.totals, few.open, few.writes)
    usage = await _usage(quota, users)
    assert all(usage[who][0] == few_usage[who][0] + 3000 for who in users)


class _Interrupted:
    """A ledger source that runs ``meanwhile`` when the totals arrive, then hands on totals ten times too big
    (what a rebuild that read a stale ledger would write)."""

    def __init__(self, inner: LedgerSource, meanwhile: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._meanwhile = meanwhile

    async def ledger_rows(self, day: Window, month: Window, open_since: datetime) -> AsyncGenerator[LedgerBatch, None]:
        async with contextlib.aclosing(self._inner.ledger_rows(day, month, open_since)) as rows:
            async for batch in rows:
                if isinstance(batch, list) and batch and isinstance(batch[0], UsageTotals):
                    await self._meanwhile()
                    yield [UsageTotals(t.user_id, t.day_tokens * 10, t.month_tokens * 10) for t in batch]
                else:
                    yield batch

    async def charged(self, request_id: str) -> ChargedRequest | None:
        return await self._inner.charged(request_id)


async def test_a_rebuild_whose_lock_was_taken_over_cannot_corrupt_the_counters(
    quota: QuotaService, pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock
) -> None:
    who = user()
    await charge_ledger(pool, [(f"a-{who}", who, 100, clock.now), (f"b-{who}", who, 11, clock.now)])
    lock = f"{migrated.redis_prefix}quota:rebuild-lock"

    async def lock_expires_and_another_process_rebuilds() -> None:
        await client.delete(lock)  # as if this rebuild had stalled past its lock's TTL
        other = RedisLedger(client, migrated.redis_prefix, PostgresLedgerSource(pool), reservation_ttl_s=300)
        assert await other.ensure_built(clock.now) is True

    stale = RedisLedger(
        client,
        migrated.redis_prefix,
        _Interrupted(PostgresLedgerSource(pool), lock_expires_and_another_process_rebuilds),
        reservation_ttl_s=300,
    )
    await flush_quota_keys(client, migrated)
    assert await stale.ensure_built(clock.now) is False  # its writes were refused: the other one rebuilt

    assert stale.last_rebuild is not None
    assert stale.last_rebuild.totals >= 1
    assert (await quota.view(who)).day.used == 111
    # Each fenced write checks the token first: with another token, nothing is written.
    fenced = client.register_script(scripts.FENCED_RESTORE_TOTALS)
    refused = await fenced(args=[f"{migrated.redis_prefix}quota:", "not-the-lock", "d", "m", 9, 9, who, 5, 5])
    assert refused == -1
    assert (await quota.view(who)).day.used == 111


async def test_the_lock_is_renewed_while_a_rebuild_outlasts_its_ttl(
    pool: asyncpg.Pool, client: redis.Redis, migrated: Settings, clock: Clock
) -> None:
    who = user()
    await charge_ledger(pool, [(f"a-{who}", who, 21, clock.now)])
    lock = f"{migrated.redis_prefix}quota:rebuild-lock"
    ttl_s = 0.3
    loop = asyncio.get_running_loop()

    async def outlast_the_ttl() -> None:
        token = await client.get(lock)
        assert token is not None
        started = loop.time()
        extended = 0
        last_ttl = await client.pttl(lock)

        async def renewed_long_enough() -> bool:
            nonlocal extended, last_ttl
            assert await client.get(lock) == token, "the rebuild's lock expired under it"
            ttl = await client.pttl(lock)
            extended += ttl > last_ttl
            last_ttl = ttl
            return extended >= 3 and loop.time() - started > 4 * ttl_s

        await eventually(renewed_long_enough, "the lock renewed past four of its TTLs", deadline_s=30, interval_s=0.02)

    slow = RedisLedger(
        client,
        migrated.redis_prefix,
        _Slow(PostgresLedgerSource(pool), outlast_the_ttl),
        reservation_ttl_s=300,
        lock_ttl_s=ttl_s,
    )
    await flush_quota_keys(client, migrated)
    assert await slow.ensure_built(clock.now) is True
    assert slow.last_rebuild is not None
    assert slow.last_rebuild.lock_renewals >= 3
    assert not await client.exists(lock)  # freed when done
    limits = (await QuotaService(pool, client, QuotaSettings.of(migrated), clock).view(who)).day
    assert limits.used == 21


class _Slow:
    """A ledger source that waits on ``meanwhile`` before its first batch."""

    def __init__(self, inner: LedgerSource, meanwhile: Callable[[], Awaitable[None]]) -> None:
        self._inner = inner
        self._meanwhile = meanwhile

    async def ledger_rows(self, day: Window, month: Window, open_since: datetime) -> AsyncGenerator[LedgerBatch, None]:
        await self._meanwhile()
        async with contextlib.aclosing(self._inner.ledger_rows(day, month, open_since)) as rows:
            async for batch in rows:
                yield batch

    async def charged(self, request_id: str) -> ChargedRequest | None:
        return await self._inner.charged(request_id)

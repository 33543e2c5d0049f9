"""Fault 4: Redis restarted under load (``shutdown nosave``: every key is gone afterwards).

Usage survives exactly (the counters are rebuilt from the Postgres ledger before anything is
admitted), the quota is still enforced for a user who spent it, and the read API answers while
Redis is down (it falls back to Postgres).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from tests.support.faults import (
    FaultTable,
    SteadyLoad,
    Submissions,
    assert_invariant,
    check_invariant,
    error_codes,
    grant_plan,
    start_redis,
    stop_redis,
    submit_one,
    users_of,
    wait_terminal,
)
from tests.support.isolation import Namespace, isolated_namespace
from tests.support.services import Platform, running_platform

pytestmark = pytest.mark.fault

TIGHT_USER = "redis-tight-u0"  # a daily quota of a few requests
TIGHT_TOKENS_PER_DAY = 100


async def _tighten(ns: Namespace) -> None:
    conn = await asyncpg.connect(ns.postgres_dsn)
    try:
        await conn.execute(
            "INSERT INTO user_quotas (user_id, plan, tokens_per_day, requests_per_minute) VALUES ($1, 'pro', $2, 600)",
            TIGHT_USER,
            TIGHT_TOKENS_PER_DAY,
        )
    finally:
        await conn.close()


async def _refused(platform: Platform, into: Submissions, i: int) -> str | None:
    """One request of the tight user, settled: how the quota refused it (429 at the gateway, or
    rejected by the worker's reservation), or None when it ran."""
    async with httpx.AsyncClient(timeout=15.0) as client:
        body = {"prompt": f"spend {i}", "user_id": TIGHT_USER, "model": "basic-model", "max_tokens": 64}
        before = set(into.accepted)
        code = await submit_one(client, platform.gateway_url, body, into)
    if code == 429:
        return "429"
    new = [rid for rid in into.accepted if rid not in before]
    await wait_terminal(platform.namespace.postgres_dsn, new, timeout_s=30)
    codes = await error_codes(platform.namespace.postgres_dsn, new)
    return "rejected:quota_exceeded" if codes.get("quota_exceeded") else None


async def _spend_quota(platform: Platform, into: Submissions) -> str | None:
    for i in range(30):
        if (refusal := await _refused(platform, into, i)) is not None:
            return refusal
    return None


async def test_redis_restart_under_load(triton_grpc_url: str, fault_table: FaultTable) -> None:
    started = time.monotonic()
    with isolated_namespace("f-redis") as ns, running_platform(ns, triton_grpc_url) as platform:
        users = users_of("redis", 4)
        await grant_plan(ns.postgres_dsn, users)
        await _tighten(ns)
        tight = Submissions()
        assert await _spend_quota(platform, tight) is not None
        probe_id = next(iter(tight.accepted))

        async with SteadyLoad(platform.gateway_url, users, rate_per_s=10, max_requests=400) as load:
            await asyncio.sleep(2.0)
            await asyncio.to_thread(stop_redis)
            try:
                async with httpx.AsyncClient(timeout=15.0) as client:
                    view = await client.get(f"{platform.api_url}/api/v1/inference/{probe_id}")
                    read_api_while_down = (view.status_code, view.json().get("status") if view.is_success else None)
            finally:
                await asyncio.to_thread(start_redis)
            await asyncio.sleep(3.0)
        submissions = load.result

        await wait_terminal(ns.postgres_dsn, submissions.accepted, timeout_s=180)
        after_tight = Submissions()
        still_refused = await _refused(platform, after_tight, 99)
        quota = httpx.get(f"{platform.api_url}/api/v1/users/{TIGHT_USER}/quota", timeout=15).json()
        everything = submissions.merge(tight).merge(after_tight)
        report = await check_invariant(ns, everything.accepted, api_url=platform.api_url, users=[TIGHT_USER])
        fault_table.record(
            "Redis restart under load",
            everything,
            report,
            started,
            notes=f"refused {dict(everything.refused)}; read API while down {read_api_while_down}; "
            f"tight user after restart: {still_refused}",
        )
        assert_invariant(report, platform)
        assert report.completed + report.rejected == len(everything.accepted)
        assert read_api_while_down == (200, "completed")
        assert still_refused is not None  # the rebuilt counters still hold the spent quota
        used, ledger = report.quota[TIGHT_USER]
        assert used == ledger > 0
        day = next(w for w in quota["windows"] if w["window"] == "day")
        assert day["used"] == ledger

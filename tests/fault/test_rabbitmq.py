"""Faults 2 and 9: RabbitMQ restarted under load (one outage serves both, to keep it short).

While the broker is down the gateway answers 503 and records nothing (no status entry, no quota
hold, no row); /readyz reports it. After ``start_app`` the gateway accepts again, and the consumers
come back: requests submitted AFTER the restart complete (FastStream once recovered connections but
not consumers).
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest
import redis

from projections.status_cache import StatusKeys
from quota.ledger import QuotaKeys
from tests.support.faults import (
    FaultTable,
    SteadyLoad,
    Submissions,
    assert_invariant,
    check_invariant,
    ensure_services,
    grant_plan,
    start_rabbitmq,
    stop_rabbitmq,
    submit_batch,
    submit_one,
    users_of,
    wait_terminal,
)
from tests.support.isolation import Namespace, isolated_namespace
from tests.support.services import Platform, running_platform

pytestmark = pytest.mark.fault

DOWN_USER = "rmq-down-u0"  # submits only while the broker is down: nothing may be recorded for it
DOWN_SUBMITS = 5
AFTER_RESTART = 40


async def _until_accepted(platform: Platform, user: str, into: Submissions, timeout_s: float = 90.0) -> None:
    """Submit until the gateway answers 202 again (its broker connection is restored)."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=15.0) as client:
        while time.monotonic() < deadline:
            body = {"prompt": "after the restart", "user_id": user, "model": "basic-model", "max_tokens": 8}
            if await submit_one(client, platform.gateway_url, body, into) == 202:
                return
            await asyncio.sleep(1.0)
    raise AssertionError(f"the gateway did not accept again within {timeout_s}s: {dict(into.refused)}")


async def _recorded_for(ns: Namespace, user: str) -> dict[str, int]:
    conn = await asyncpg.connect(ns.postgres_dsn)
    try:
        rows = int(await conn.fetchval("SELECT count(*) FROM inference_requests WHERE user_id = $1", user))
        usage = int(await conn.fetchval("SELECT count(*) FROM token_usage WHERE user_id = $1", user))
    finally:
        await conn.close()
    client = redis.Redis.from_url(ns.redis_url, decode_responses=True)
    try:
        statuses = sum(
            1
            for key in client.scan_iter(match=StatusKeys(ns.redis_prefix).pattern())
            if client.hget(key, "user_id") == user
        )
        reserved = int(client.get(QuotaKeys(ns.redis_prefix).reserved_sum(user)) or 0)
    finally:
        client.close()
    return {"rows": rows, "token_usage": usage, "status_entries": statuses, "reserved": reserved}


async def test_rabbitmq_restart_under_load(triton_grpc_url: str, fault_table: FaultTable) -> None:
    started = time.monotonic()
    with isolated_namespace("f-rmq") as ns, running_platform(ns, triton_grpc_url) as platform:
        users = users_of("rmq", 4)
        await grant_plan(ns.postgres_dsn, [*users, DOWN_USER])
        down = Submissions()
        async with SteadyLoad(platform.gateway_url, users, rate_per_s=10, max_requests=400) as load:
            await asyncio.sleep(2.0)
            await asyncio.to_thread(stop_rabbitmq)
            try:
                down_started = time.monotonic()
                async with httpx.AsyncClient(timeout=30.0) as client:
                    codes = [
                        await submit_one(client, platform.gateway_url, _body(DOWN_USER, i), down)
                        for i in range(DOWN_SUBMITS)
                    ]
                    gateway_ready = (await client.get(f"{platform.gateway_url}/readyz")).status_code
                down_s = time.monotonic() - down_started
            finally:
                await asyncio.to_thread(start_rabbitmq)
                await asyncio.to_thread(ensure_services)
            after = Submissions()
            await _until_accepted(platform, users[0], after)
        before = load.result

        # Requests submitted after the restart must complete: the consumers came back.
        after = await submit_batch(platform.gateway_url, AFTER_RESTART, users, into=after)
        everything = before.merge(after)
        await wait_terminal(ns.postgres_dsn, everything.accepted, timeout_s=120)
        report = await check_invariant(ns, everything.accepted, api_url=platform.api_url, users=[DOWN_USER])
        fault_table.record(
            "RabbitMQ restart under load",
            everything,
            report,
            started,
            notes=f"refused {dict(everything.refused)}",
        )
        recorded = await _recorded_for(ns, DOWN_USER)
        down_report = await check_invariant(ns, down.accepted, users=[DOWN_USER])
        fault_table.record(
            "gateway submit while RabbitMQ down",
            down,
            down_report,
            started,
            notes=f"{DOWN_SUBMITS} x {codes[0]} in {down_s:.1f}s; recorded {recorded}",
        )
        assert_invariant(report, platform)
        assert codes == [503] * DOWN_SUBMITS
        assert gateway_ready == 503
        assert recorded == {"rows": 0, "token_usage": 0, "status_entries": 0, "reserved": 0}
        after_ids = list(after.accepted)
        assert len(after_ids) >= AFTER_RESTART
        assert report.completed == len(everything.accepted)


def _body(user: str, i: int) -> dict[str, object]:
    return {"prompt": f"while the broker is down {i}", "user_id": user, "model": "basic-model", "max_tokens": 8}

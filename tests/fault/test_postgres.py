"""Fault 3: Postgres stopped for 30 s under load, then started.

The gateway and the worker keep going (quota limits are cached, the counters live in Redis); the
collector's projections pause (its messages stay unacked: nothing is acked before it is written)
and resume once Postgres is back; /readyz of the collector reports the outage.
"""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from events.topology import PROJECTIONS_QUEUE
from tests.support.faults import (
    FaultTable,
    SteadyLoad,
    assert_invariant,
    check_invariant,
    grant_plan,
    queue_depth,
    start_postgres,
    stop_postgres,
    users_of,
    wait_terminal,
)
from tests.support.isolation import isolated_namespace
from tests.support.services import running_platform

pytestmark = pytest.mark.fault

OUTAGE_S = 30.0


async def test_postgres_stopped_30s_under_load(triton_grpc_url: str, fault_table: FaultTable) -> None:
    started = time.monotonic()
    with isolated_namespace("f-pg") as ns, running_platform(ns, triton_grpc_url) as platform:
        users = users_of("pg", 4)
        await grant_plan(ns.postgres_dsn, users)
        async with SteadyLoad(platform.gateway_url, users, rate_per_s=8, max_requests=600) as load:
            await asyncio.sleep(3.0)
            await asyncio.to_thread(stop_postgres)
            try:
                await asyncio.sleep(OUTAGE_S / 2)
                async with httpx.AsyncClient(timeout=10.0) as client:
                    collector_ready = (await client.get(platform.services["collector"].ready_url)).status_code
                await asyncio.sleep(OUTAGE_S / 2)
            finally:
                await asyncio.to_thread(start_postgres)
            await asyncio.sleep(5.0)  # load goes on after the restart too
        submissions = load.result

        await wait_terminal(ns.postgres_dsn, submissions.accepted, timeout_s=180)
        report = await check_invariant(ns, submissions.accepted, api_url=platform.api_url)
        dead = await queue_depth(ns.rabbitmq_url, PROJECTIONS_QUEUE + ".dlq")
        fault_table.record(
            f"Postgres stopped {OUTAGE_S:.0f}s under load",
            submissions,
            report,
            started,
            notes=f"refused {dict(submissions.refused)}; collector /readyz during outage {collector_ready}",
        )
        assert_invariant(report, platform)
        assert collector_ready == 503
        assert dead == 0
        assert report.completed == len(submissions.accepted)

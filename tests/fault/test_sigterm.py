"""Fault 8: SIGTERM to each service under load: exit 0, in-flight work finished or requeued (no DLQ), then
after a restart everything accepted ends terminal, charged once."""

from __future__ import annotations

import asyncio
import time

import pytest

from events.topology import PROJECTIONS_QUEUE, requests_queue
from tests.support.faults import (
    FaultTable,
    SteadyLoad,
    assert_invariant,
    check_invariant,
    count_statuses,
    grant_plan,
    queue_depth,
    submit_batch,
    users_of,
    wait_terminal,
)
from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, running_platform

pytestmark = pytest.mark.fault

ENV = {"MLP_MODELS": "basic-model,slow-model", "MLP_TRITON_TIMEOUT_S": "30", "MLP_GRACEFUL_TIMEOUT_S": "20"}
SERVICES = ("gateway", "worker", "collector", "api")
DLQS = (
    requests_queue("basic-model").dead_letter_queue or "",
    requests_queue("slow-model").dead_letter_queue or "",
    PROJECTIONS_QUEUE + ".dlq",
)


async def _wait_running(platform: Platform, ids: list[str], timeout_s: float = 30.0) -> None:
    """Until the worker has started at least one of ``ids`` (it then holds in-flight work)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        statuses = await count_statuses(platform.namespace.postgres_dsn, ids)
        if statuses["running"]:
            return
        await asyncio.sleep(0.1)


async def test_sigterm_each_service_under_load(triton_grpc_url: str, fault_table: FaultTable) -> None:
    started = time.monotonic()
    with isolated_namespace("f-term") as ns, running_platform(ns, triton_grpc_url, extra_env=ENV) as platform:
        users = users_of("term", 5)
        await grant_plan(ns.postgres_dsn, users)
        exit_codes: dict[str, int] = {}
        async with SteadyLoad(platform.gateway_url, users, rate_per_s=10, max_requests=400) as load:
            await asyncio.sleep(1.0)
            slow = await submit_batch(platform.gateway_url, 0, users)
            for name in SERVICES:
                if name == "worker":  # make sure it holds unfinished work (slow-model: 5 s per batch)
                    slow = await submit_batch(platform.gateway_url, 6, users, model="slow-model", into=slow)
                    await _wait_running(platform, list(slow.accepted))
                exit_codes[name] = await asyncio.to_thread(platform.services[name].terminate, 60.0)
                await asyncio.to_thread(platform.start, name)
                await asyncio.sleep(1.0)
        submissions = load.result.merge(slow)

        await wait_terminal(ns.postgres_dsn, submissions.accepted, timeout_s=120)
        report = await check_invariant(ns, submissions.accepted, api_url=platform.api_url)
        dead_letters = {q: await queue_depth(ns.rabbitmq_url, q) for q in DLQS}
        fault_table.record(
            "SIGTERM gateway, worker, collector, read API",
            submissions,
            report,
            started,
            notes=f"exit codes {exit_codes}; refused {dict(submissions.refused)}",
        )
        assert_invariant(report, platform)
        assert exit_codes == dict.fromkeys(SERVICES, 0)
        assert sum(dead_letters.values()) == 0, dead_letters
        assert len(submissions.accepted) > 0

"""Fault 1: kill -9 a worker while it holds messages; a new worker finishes them, each charged once."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from events.model import decode_event
from events.topology import requests_queue
from mlp.bus import EventPublisher, make_broker
from mlp.settings import Settings
from tests.support.faults import (
    FaultTable,
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

# slow-model answers a batch of up to 8 every 5 s: a worker always holds unfinished messages.
SLOW_ENV = {"MLP_MODELS": "basic-model,slow-model", "MLP_TRITON_TIMEOUT_S": "60", "MLP_WORKER_CONCURRENCY": "8"}
REQUESTS = 24


async def _wait_completed(platform: Platform, ids: list[str], at_least: int, timeout_s: float = 90.0) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        done = (await count_statuses(platform.namespace.postgres_dsn, ids))["completed"]
        if done >= at_least or time.monotonic() > deadline:
            return done
        await asyncio.sleep(0.2)


async def _redeliver_requested(platform: Platform, request_ids: list[str]) -> None:
    """What a worker killed after publishing the outcome, before its ack, leaves behind: the same
    InferenceRequested (same event_id) delivered again."""
    conn = await asyncpg.connect(platform.namespace.postgres_dsn)
    try:
        rows = await conn.fetch(
            "SELECT payload::text AS body FROM event_store WHERE type = 'InferenceRequested' AND request_id = ANY($1)",
            request_ids,
        )
    finally:
        await conn.close()
    broker = make_broker(Settings(environment="test", rabbitmq_url=platform.namespace.rabbitmq_url))
    await broker.connect()
    try:
        publisher = EventPublisher(broker, timeout_s=10)
        for row in rows:
            await publisher.publish(decode_event(row["body"]))
    finally:
        await broker.stop()


async def test_kill_9_worker_holding_messages(triton_grpc_url: str, fault_table: FaultTable) -> None:
    started = time.monotonic()
    with isolated_namespace("f-kill") as ns, running_platform(ns, triton_grpc_url, extra_env=SLOW_ENV) as platform:
        users = users_of("kill", 3)
        await grant_plan(ns.postgres_dsn, users)
        load = await submit_batch(platform.gateway_url, REQUESTS, users, model="slow-model", concurrency=REQUESTS)
        ids = list(load.accepted)
        assert len(ids) == REQUESTS, load.refused

        # Kill twice, each time while some requests are done and others are held (in Triton or prefetched).
        kills = []
        for target in (REQUESTS // 4, REQUESTS // 2):
            await _wait_completed(platform, ids, target)
            statuses = await count_statuses(ns.postgres_dsn, ids)
            platform.services["worker"].kill()
            kills.append(dict(statuses))
            await asyncio.to_thread(platform.start, "worker")

        finished = [rid for rid in ids if rid in await _completed_ids(ns.postgres_dsn, ids)][:5]
        await _redeliver_requested(platform, finished)

        await wait_terminal(ns.postgres_dsn, ids, timeout_s=180)
        report = await check_invariant(ns, load.accepted, api_url=platform.api_url)
        row = fault_table.record(
            "kill -9 worker (x2) + redelivery after outcome", load, report, started, notes=f"statuses at kills {kills}"
        )
        print(row, report.quota, report.open_reservations)
        assert_invariant(report, platform)
        assert report.completed == REQUESTS
        # The kills hit held messages: some requests were started twice (redelivered to the new worker).
        assert await _restarted_requests(ns.postgres_dsn, ids) >= 1
        assert await queue_depth(ns.rabbitmq_url, requests_queue("slow-model").dead_letter_queue or "") == 0


async def _completed_ids(dsn: str, ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT request_id FROM inference_requests WHERE request_id = ANY($1) AND status = 'completed'", ids
        )
    finally:
        await conn.close()
    return {r["request_id"] for r in rows}


async def _restarted_requests(dsn: str, ids: list[str]) -> int:
    conn = await asyncpg.connect(dsn)
    try:
        return int(
            await conn.fetchval(
                "SELECT count(*) FROM (SELECT request_id FROM event_store WHERE type = 'InferenceStarted' "
                "AND request_id = ANY($1) GROUP BY request_id HAVING count(*) > 1) AS twice",
                ids,
            )
        )
    finally:
        await conn.close()

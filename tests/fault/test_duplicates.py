"""Fault 5: every event delivered twice and in reverse order; nothing is projected or charged twice.

The collector is stopped while requests run, so their events wait in ``mlp.projections``; the test
takes them off the queue and publishes them again (``mlp.bus.EventPublisher`` into the platform's
vhost) newest first, each twice, before the collector comes back. The duplicated
``InferenceRequested`` also reach the worker again (as after a crash between publish and ack).
"""

from __future__ import annotations

import asyncio
import time

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from events.model import AnyEvent, decode_event
from events.topology import PROJECTIONS_QUEUE
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
    wait_queue_depth,
    wait_terminal,
)
from tests.support.isolation import isolated_namespace
from tests.support.services import running_platform

pytestmark = pytest.mark.fault

REQUESTS = 40
EVENTS_PER_REQUEST = 3  # requested, started, outcome (InferenceStarted for every request: see below)
# The worker publishes InferenceStarted for every request here, so each stream has three events to reorder.
EVERY_START = {"MLP_STARTED_EVENT_AFTER_MS": "0"}


async def _take_all(
    rabbitmq_url: str, expected: int
) -> tuple[aio_pika.abc.AbstractConnection, list[AnyEvent], list[aio_pika.abc.AbstractIncomingMessage]]:
    """Every message of the projections queue, held unacked (the caller acks after republishing)."""
    connection = await aio_pika.connect(rabbitmq_url)
    channel = await connection.channel()
    queue = await channel.declare_queue(PROJECTIONS_QUEUE, passive=True)
    held: list[AbstractIncomingMessage] = []
    while len(held) < expected:
        message = await queue.get(no_ack=False, fail=False, timeout=10)
        if message is None:
            break
        held.append(message)
    return connection, [decode_event(m.body) for m in held], held


async def test_duplicated_and_reordered_events(triton_grpc_url: str, fault_table: FaultTable) -> None:
    started = time.monotonic()
    with isolated_namespace("f-dup") as ns, running_platform(ns, triton_grpc_url, extra_env=EVERY_START) as platform:
        users = users_of("dup", 4)
        await grant_plan(ns.postgres_dsn, users)
        assert platform.services["collector"].terminate() == 0

        load = await submit_batch(platform.gateway_url, REQUESTS, users)
        assert len(load.accepted) == REQUESTS, load.refused
        expected = REQUESTS * EVENTS_PER_REQUEST
        assert await wait_queue_depth(ns.rabbitmq_url, PROJECTIONS_QUEUE, expected) == expected

        connection, events, held = await _take_all(ns.rabbitmq_url, expected)
        try:
            assert len(events) == expected
            broker = make_broker(Settings(environment="test", rabbitmq_url=ns.rabbitmq_url))
            await broker.connect()
            try:
                publisher = EventPublisher(broker, timeout_s=10)
                for event in reversed(events):  # outcome, then started, then requested: newest first
                    await publisher.publish(event)
                    await publisher.publish(event)  # the same event (same event_id) once more
            finally:
                await broker.stop()
            for message in held:
                await message.ack()
        finally:
            await connection.close()

        platform.start("collector")
        await wait_terminal(ns.postgres_dsn, load.accepted, timeout_s=120)
        # The worker's answers to the duplicated requests are projected too: let the queue drain.
        await wait_queue_depth_zero(ns.rabbitmq_url)
        report = await check_invariant(ns, load.accepted, api_url=platform.api_url)
        fault_table.record("same event twice + reordered", load, report, started)
        assert_invariant(report, platform)
        assert report.completed == REQUESTS
        assert (await count_statuses(ns.postgres_dsn, load.accepted))["completed"] == REQUESTS
        stored = await _stored_event_ids(ns.postgres_dsn, list(load.accepted))
        assert {e.event_id for e in events} <= stored  # each original event stored once (event_id is unique)
        sample = next(iter(load.accepted))
        view = httpx.get(f"{platform.api_url}/api/v1/inference/{sample}", timeout=10).json()
        assert view["status"] == "completed"
        assert await queue_depth(ns.rabbitmq_url, PROJECTIONS_QUEUE + ".dlq") == 0


async def wait_queue_depth_zero(rabbitmq_url: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while await queue_depth(rabbitmq_url, PROJECTIONS_QUEUE) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)


async def _stored_event_ids(dsn: str, ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch("SELECT event_id::text AS id FROM event_store WHERE request_id = ANY($1)", ids)
    finally:
        await conn.close()
    return {r["id"] for r in rows}

"""SIGTERM in the middle of a stream: what was not written goes back to the queue, nothing to the DLQ."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import aio_pika
import asyncpg
import httpx
import pytest

from events.topology import DLQ_SUFFIX, PROJECTIONS_QUEUE
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.settings import Settings
from projections.sample_events import synthetic_stream
from results_collector.main import build_app
from tests.support.services import free_port
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


async def _ready_count(url: str, queue: str) -> int:
    connection = await aio_pika.connect(url)
    async with connection:
        declared = await (await connection.channel()).declare_queue(queue, passive=True)
        count = declared.declaration_result.message_count
        assert count is not None
        return count


async def _queued_ids(url: str, queue: str) -> set[str]:
    """The message ids waiting in a queue (fetched unacked: they return when the connection closes)."""
    ids: set[str] = set()
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=0)
        declared = await channel.declare_queue(queue, passive=True)
        while (message := await declared.get(no_ack=False, fail=False, timeout=5)) is not None:
            assert message.message_id is not None
            ids.add(message.message_id)
    return ids


async def _stored_ids(dsn: str, request_ids: list[str]) -> set[str]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "SELECT event_id::text AS id FROM event_store WHERE request_id = ANY($1::text[])", request_ids
        )
        return {r["id"] for r in rows}
    finally:
        await conn.close()


async def _run_collector(settings: Settings) -> asyncio.Task[None]:
    task = asyncio.create_task(build_app(settings).run())
    url = f"http://{settings.health_host}:{settings.collector_health_port}/readyz"

    async def ready() -> bool:
        if task.done():
            task.result()
        try:
            async with httpx.AsyncClient() as client:
                return (await client.get(url, timeout=2)).status_code == 200
        except httpx.HTTPError:
            return False

    await eventually(ready, "collector ready")
    return task


def _forget_signal_handlers() -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.remove_signal_handler(sig)


async def test_sigterm_mid_stream_requeues_what_was_not_written_and_a_restart_finishes(migrated: Settings) -> None:
    settings = migrated.model_copy(
        update={"collector_health_port": free_port(), "collector_batch_size": 25, "collector_batch_wait_ms": 5}
    )
    events = synthetic_stream(300, seed=uuid.uuid4().int % 1000)
    all_ids = {e.event_id for e in events}
    request_ids = sorted({e.request_id for e in events})
    dlq = PROJECTIONS_QUEUE + DLQ_SUFFIX

    broker = make_broker(settings, app_id="test-publisher")
    await broker.connect()
    try:
        await declare_topology(broker, settings.models)
        dead_before = await _ready_count(settings.rabbitmq_url, dlq)
        await EventPublisher(broker, timeout_s=10).publish_many(events)  # queued before the collector starts
    finally:
        await broker.stop()

    task = await _run_collector(settings)
    try:

        async def some_stored() -> bool:
            return len(await _stored_ids(settings.postgres_dsn, request_ids)) > 0

        await eventually(some_stored, "the first batch stored")
        os.kill(os.getpid(), signal.SIGTERM)  # FastStream's handler: app.exit() -> graceful shutdown
        await task
    finally:
        _forget_signal_handlers()

    stored = await _stored_ids(settings.postgres_dsn, request_ids)
    queued = await _queued_ids(settings.rabbitmq_url, PROJECTIONS_QUEUE)
    assert stored | queued >= all_ids  # nothing lost: written, or back in the queue
    assert await _ready_count(settings.rabbitmq_url, dlq) == dead_before  # nothing rejected on shutdown

    task = await _run_collector(settings)
    try:

        async def all_stored() -> bool:
            return await _stored_ids(settings.postgres_dsn, request_ids) == all_ids

        await eventually(all_stored, "every event stored after the restart")
    finally:
        os.kill(os.getpid(), signal.SIGTERM)  # stopped as in a pod
        await task
        _forget_signal_handlers()
    assert await _ready_count(settings.rabbitmq_url, dlq) == dead_before

"""Postgres is the truth: with Redis unreachable the collector still stores, projects and acks, and says not ready."""

from __future__ import annotations

import asyncio
import os
import signal

import asyncpg
import httpx
import pytest

from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.settings import Settings
from projections.sample_events import request_stream
from results_collector.main import build_app
from tests.support.services import free_port
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration


async def test_with_redis_down_events_are_still_projected_and_readiness_says_why(migrated: Settings) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = migrated.model_copy(update={"collector_health_port": free_port(), "redis_url": dead_redis})
    stream = request_stream("alice.redis-down-1")
    task = asyncio.create_task(build_app(settings).run())
    conn = await asyncpg.connect(settings.postgres_dsn)
    broker = make_broker(settings, app_id="test-publisher")
    try:
        await broker.connect()
        await declare_topology(broker, settings.models)
        await EventPublisher(broker, timeout_s=5).publish_many(stream)

        async def projected() -> bool:
            assert not task.done(), "the collector stopped"
            status = await conn.fetchval(
                "SELECT status FROM inference_requests WHERE request_id = $1", stream[0].request_id
            )
            return bool(status == "completed")

        await eventually(projected, "projected while Redis is down")
        async with httpx.AsyncClient() as client:
            url = f"http://{settings.health_host}:{settings.collector_health_port}/readyz"
            answer = await client.get(url, timeout=5)
        assert answer.status_code == 503
        assert answer.json()["checks"] == {"rabbitmq": True, "postgres": True, "redis": False}
    finally:
        await broker.stop()
        await conn.close()
        if not task.done():
            os.kill(os.getpid(), signal.SIGTERM)  # FastStream's handler stops the app, as in a pod
            await task
        for sig in (signal.SIGINT, signal.SIGTERM):
            asyncio.get_running_loop().remove_signal_handler(sig)

"""Postgres is the truth: with Redis unreachable the collector still stores, projects and acks, and says not ready."""

from __future__ import annotations

import asyncio
import os
import signal
import socket

import asyncpg
import httpx
import pytest

from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.settings import Settings
from projections.sample_events import request_stream
from results_collector.main import build_app

pytestmark = pytest.mark.integration

DEADLINE_S = 60.0  # an upper bound on waiting (fail instead of hanging), not a timing goal


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_with_redis_down_events_are_still_projected_and_readiness_says_why(migrated: Settings) -> None:
    dead_redis = f"redis://127.0.0.1:{_free_port()}/0"  # nothing listens there
    settings = migrated.model_copy(update={"collector_health_port": _free_port(), "redis_url": dead_redis})
    stream = request_stream("redis-down-1")
    task = asyncio.create_task(build_app(settings).run())
    conn = await asyncpg.connect(settings.postgres_dsn)
    broker = make_broker(settings, app_id="test-publisher")
    try:
        await broker.connect()
        await declare_topology(broker, settings.models)
        await EventPublisher(broker, timeout_s=5).publish_many(stream)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEADLINE_S
        while await conn.fetchval("SELECT status FROM inference_requests WHERE request_id = $1", "redis-down-1") != (
            "completed"
        ):
            assert not task.done(), "the collector stopped"
            assert loop.time() < deadline, "not projected while Redis is down"
            await asyncio.sleep(0.05)
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

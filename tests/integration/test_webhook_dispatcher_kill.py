"""The webhook dispatcher as real processes (its own namespace: no other dispatcher competes): killed with
SIGKILL in the middle of a retry, it loses nothing; the next process delivers with the same webhook-id."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from events.model import InferenceCompleted, new_event_id, utc_now
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.settings import Settings
from tests.support.services import ServiceProcess, free_port
from tests.support.waiting import eventually
from tests.support.webhook_receiver import Received, WebhookReceiver
from webhooks import store

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def dispatcher_process(settings: Settings, log_path: Path) -> ServiceProcess:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLP_", "OTEL_"))}
    env.update(
        {
            "PYTHONPATH": f"{ROOT / 'platform'}:{ROOT}",
            "MLP_ENVIRONMENT": "test",
            "MLP_RABBITMQ_URL": settings.rabbitmq_url,
            "MLP_POSTGRES_DSN": settings.postgres_dsn,
            "MLP_REDIS_URL": settings.redis_url,
            "MLP_REDIS_PREFIX": settings.redis_prefix,
            "MLP_DISPATCHER_HEALTH_PORT": str(port),
            "MLP_WEBHOOK_ALLOW_PRIVATE": "true",
            "MLP_WEBHOOK_BACKOFF_BASE_S": "0.2",
            "MLP_WEBHOOK_BACKOFF_CAP_S": "0.5",
            "MLP_WEBHOOK_TIMEOUT_S": "1",
            "MLP_WEBHOOK_POLL_INTERVAL_S": "0.1",
            "OTEL_SDK_DISABLED": "true",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return ServiceProcess(
        name="dispatcher",
        argv=[sys.executable, "-m", "ops.cli", "dispatcher"],
        env=env,
        ready_url=f"http://127.0.0.1:{port}/readyz",
        log_path=log_path,
    )


def signed_by(secret: str, received: Received) -> bool:
    key = base64.b64decode(secret.removeprefix("whsec_"))
    signed = f"{received.headers['webhook-id']}.{received.headers['webhook-timestamp']}.".encode() + received.body
    expected = "v1," + base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    return expected in received.headers["webhook-signature"].split()


@pytest.fixture
async def pool(module_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(module_settings.postgres_dsn, min_size=1, max_size=2)
    assert pool is not None
    yield pool
    await pool.close()


async def _true(value: bool) -> bool:
    return value


async def test_the_dispatcher_killed_mid_retry_loses_nothing(
    module_settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    receiver = WebhookReceiver().start()
    receiver.answers.append(500)  # the first attempt fails ...
    receiver.hold_from = 1  # ... and the retry is held unanswered, while the dispatcher is killed
    broker = make_broker(module_settings, app_id="test-publisher")
    first = dispatcher_process(module_settings, tmp_path / "dispatcher-1.log")
    second = dispatcher_process(module_settings, tmp_path / "dispatcher-2.log")
    try:
        hook, secret = await store.create_webhook(
            pool, "kill-user", receiver.url, ["InferenceCompleted"], max_per_user=5
        )
        first.start().wait_ready()
        await broker.connect()
        await declare_topology(broker, module_settings.models)
        event = InferenceCompleted(
            event_id=new_event_id(),
            request_id=new_event_id(),
            occurred_at=utc_now(),
            user_id="kill-user",
            model="basic-model",
            completion="done",
            prompt_tokens=1,
            completion_tokens=1,
            latency_ms=1.0,
        )
        await EventPublisher(broker, timeout_s=5).publish(event)

        await eventually(lambda: _true(receiver.hung.is_set()), "the retry in flight")
        first.kill()  # SIGKILL, mid-attempt
        row = await pool.fetchrow(
            "SELECT state, attempts FROM webhook_deliveries WHERE webhook_id = $1", hook.webhook_id
        )
        assert row is not None
        assert (row["state"], row["attempts"]) == ("pending", 2)  # the claim outlives the process: still pending
        receiver.release.set()  # the receiver recovers

        second.start().wait_ready()

        async def delivered() -> bool:
            return bool(receiver.delivered()) and (
                await pool.fetchval("SELECT state FROM webhook_deliveries WHERE webhook_id = $1", hook.webhook_id)
                == "delivered"
            )

        await eventually(delivered, "delivered by the next dispatcher after the lease", deadline_s=90)
        attempts = receiver.all()
        assert [r.answered for r in attempts] == [500, 200]  # the held attempt was never answered
        assert {r.headers["webhook-id"] for r in attempts} == {event.event_id}
        assert all(signed_by(secret, r) for r in attempts)
        assert len(receiver.delivered()) == 1
        assert second.terminate() == 0  # SIGTERM: a drained stop
    finally:
        first.kill()
        second.terminate()
        await broker.stop()
        receiver.stop()


async def test_two_dispatchers_share_the_deliveries_each_delivered_once(
    module_settings: Settings, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    receiver = WebhookReceiver().start()
    broker = make_broker(module_settings, app_id="test-publisher")
    replicas = [dispatcher_process(module_settings, tmp_path / f"replica-{i}.log") for i in range(2)]
    try:
        hook, secret = await store.create_webhook(
            pool, "shared-user", receiver.url, ["InferenceCompleted"], max_per_user=5
        )
        for replica in replicas:
            replica.start().wait_ready()
        await broker.connect()
        await declare_topology(broker, module_settings.models)
        events = [
            InferenceCompleted(
                event_id=new_event_id(),
                request_id=new_event_id(),
                occurred_at=utc_now(),
                user_id="shared-user",
                model="basic-model",
                completion="done",
                prompt_tokens=1,
                completion_tokens=1,
                latency_ms=1.0,
            )
            for _ in range(40)
        ]
        await EventPublisher(broker, timeout_s=5).publish_many(events)

        async def all_delivered() -> bool:
            done = await pool.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE webhook_id = $1 AND state = 'delivered'", hook.webhook_id
            )
            return bool(done == len(events))

        await eventually(all_delivered, "every delivery delivered", deadline_s=90)
        ids = [r.headers["webhook-id"] for r in receiver.delivered()]
        assert sorted(ids) == sorted(e.event_id for e in events)  # each once: claims are never shared
        assert all(signed_by(secret, r) for r in receiver.delivered())
    finally:
        for replica in replicas:
            replica.terminate()
        await broker.stop()
        receiver.stop()

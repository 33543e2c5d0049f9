"""Fault 6: poison messages on the requests queue and on the projections queue.

Each lands in its queue's DLQ, the consumers keep going (a normal load submitted after the poison
completes), and a poisoned request that can be identified ends ``rejected``, visible to the client.
"""

from __future__ import annotations

import json
import time

import aio_pika
import httpx
import pytest

from events.model import InferenceRequested, new_event_id, utc_now
from events.topology import EVENTS_EXCHANGE, PROJECTIONS_QUEUE, requests_queue
from mlp.bus import EventPublisher, make_broker
from mlp.settings import Settings
from tests.support.faults import (
    FaultTable,
    assert_invariant,
    check_invariant,
    error_codes,
    grant_plan,
    submit_batch,
    users_of,
    wait_queue_depth,
    wait_terminal,
)
from tests.support.isolation import isolated_namespace
from tests.support.services import running_platform

pytestmark = pytest.mark.fault

REQUESTS = 60
REQUESTS_DLQ = requests_queue("basic-model").dead_letter_queue or ""
PROJECTIONS_DLQ = PROJECTIONS_QUEUE + ".dlq"
POISON_USER = "poison-u0"


async def _publish_raw(rabbitmq_url: str, body: bytes, routing_key: str, correlation_id: str | None = None) -> None:
    """A confirmed, mandatory, persistent publish of arbitrary bytes (what a buggy client could send)."""
    connection = await aio_pika.connect(rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange(EVENTS_EXCHANGE)
        message = aio_pika.Message(
            body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=correlation_id,
            message_id=new_event_id(),
            content_type="application/json",
        )
        await exchange.publish(message, routing_key=routing_key, mandatory=True, timeout=10)


def requested(request_id: str, user_id: str, prompt: str) -> InferenceRequested:
    return InferenceRequested(
        event_id=new_event_id(),
        request_id=request_id,
        occurred_at=utc_now(),
        user_id=user_id,
        model="basic-model",
        prompt=prompt,
        max_tokens=8,
        source="bus",
    )


async def _publish_event(rabbitmq_url: str, event: InferenceRequested) -> None:
    broker = make_broker(Settings(environment="test", rabbitmq_url=rabbitmq_url))
    await broker.connect()
    try:
        await EventPublisher(broker, timeout_s=10).publish(event)
    finally:
        await broker.stop()


async def test_poison_messages_end_in_the_dlq_and_consumers_keep_going(
    triton_grpc_url: str, fault_table: FaultTable
) -> None:
    started = time.monotonic()
    with isolated_namespace("f-poison") as ns, running_platform(ns, triton_grpc_url) as platform:
        users = users_of("poison", 4)
        await grant_plan(ns.postgres_dsn, [*users, POISON_USER])
        requested_key = f"inference.requested.basic-model.{POISON_USER}"
        completed_key = f"inference.completed.basic-model.{POISON_USER}"

        # Requests queue (and, through its inference.# binding, the projections queue too):
        undecodable_id = f"{POISON_USER}.poison-{new_event_id()}"  # in the publisher's namespace
        await _publish_raw(ns.rabbitmq_url, b"\xff\x00 not json {", requested_key, correlation_id=undecodable_id)
        invalid_id = f"{POISON_USER}.poison-{new_event_id()}"  # in the publisher's namespace
        invalid = {
            "type": "InferenceRequested",
            "request_id": invalid_id,
            "user_id": POISON_USER,
            "model": "basic-model",
            "max_tokens": 0,  # must be >= 1; no event_id, occurred_at or prompt either
        }
        await _publish_raw(ns.rabbitmq_url, json.dumps(invalid).encode(), requested_key)
        # Projections queue only: undecodable, and decodable but refused by the store (event_id not a UUID).
        await _publish_raw(ns.rabbitmq_url, b"\x00garbage", completed_key)
        not_storable = {
            "type": "InferenceCompleted",
            "event_id": "not-a-uuid",
            "request_id": "poison-" + new_event_id(),
            "occurred_at": "2025-01-01T00:00:00Z",
            "user_id": POISON_USER,
            "model": "basic-model",
            "completion": "x",
            "prompt_tokens": 1,
            "completion_tokens": 1,
            "latency_ms": 1.0,
        }
        await _publish_raw(ns.rabbitmq_url, json.dumps(not_storable).encode(), completed_key)

        # A prompt Postgres cannot store (NUL): refused at the edge (422), and rejected by the worker
        # when it comes over the bus (its InferenceRequested then sits in the projections DLQ).
        body = {"prompt": "nul \u0000 inside", "user_id": POISON_USER, "model": "basic-model", "max_tokens": 8}
        response = httpx.post(f"{platform.gateway_url}/api/v1/inference", json=body, timeout=15)
        assert response.status_code == 422, response.text
        nul_id = f"{POISON_USER}.poison-{new_event_id()}"  # in the publisher's namespace
        await _publish_event(ns.rabbitmq_url, requested(nul_id, POISON_USER, prompt="nul \u0000 inside"))

        load = await submit_batch(platform.gateway_url, REQUESTS, users)
        assert len(load.accepted) == REQUESTS, load.refused
        await wait_terminal(ns.postgres_dsn, load.accepted, timeout_s=120)

        identifiable = {undecodable_id: POISON_USER, invalid_id: POISON_USER, nul_id: POISON_USER}
        await wait_terminal(ns.postgres_dsn, identifiable, timeout_s=60)
        requests_dlq = await wait_queue_depth(ns.rabbitmq_url, REQUESTS_DLQ, 2)
        projections_dlq = await wait_queue_depth(ns.rabbitmq_url, PROJECTIONS_DLQ, 5)

        report = await check_invariant(ns, {**load.accepted, **identifiable}, api_url=platform.api_url)
        load.submitted += 6  # 5 poison messages on the bus, 1 NUL prompt refused with 422
        load.refused["422"] += 1
        fault_table.record(
            "poison messages (5 on the bus, 1 at the gateway)",
            load,
            report,
            started,
            notes=f"requests DLQ {requests_dlq}, projections DLQ {projections_dlq}",
        )
        assert_invariant(report, platform)
        assert report.completed == REQUESTS
        assert requests_dlq == 2
        assert projections_dlq == 5
        # The identifiable poisoned requests are visible as rejected, with the reason.
        assert await error_codes(ns.postgres_dsn, identifiable) == {"invalid_request": 3}
        for request_id in identifiable:
            view = httpx.get(f"{platform.api_url}/api/v1/inference/{request_id}", timeout=10).json()
            assert view["status"] == "rejected", view

"""The bus as a public API, end to end: real RabbitMQ, worker, collector, read API and Triton.

A separate client (aio-pika, no platform code) publishes requests to ``mlp.events`` and listens on
a queue of its own bound to the outcome routing keys, as docs/bus.md tells users to.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import aio_pika
import httpx
import pytest

from events.model import new_event_id
from events.topology import requests_queue
from ml_service.launcher import TritonProcess
from mlp.settings import Settings
from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, running_platform
from tests.support.triton import triton_server

pytestmark = pytest.mark.e2e
__all__ = ["triton_server"]  # the session fixture, imported for this module

MODEL = "basic-model"
LIMITS = Settings()  # the platform runs with the default limits


@pytest.fixture(scope="module")
def platform(triton_server: TritonProcess) -> Iterator[Platform]:
    with isolated_namespace("bus") as ns, running_platform(ns, triton_server.grpc_url) as running:
        yield running


def _request(user_id: str, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "InferenceRequested",
        "event_id": new_event_id(),
        "request_id": new_event_id(),
        "occurred_at": datetime.now(UTC).isoformat(),
        "user_id": user_id,
        "model": MODEL,
        "prompt": "test prompt",
        "max_tokens": 8,
        "source": "bus",
    }
    body.update(overrides)
    return body


class BusClient:
    """A user's client: its own exclusive queue bound to its outcomes, confirmed mandatory publishes."""

    def __init__(self, channel: aio_pika.abc.AbstractChannel, queue: aio_pika.abc.AbstractQueue) -> None:
        self.channel = channel
        self.queue = queue
        self.outcomes: dict[str, dict[str, Any]] = {}

    async def publish(
        self, body: bytes, routing_key: str, correlation_id: str | None = None, message_id: str | None = None
    ) -> None:
        exchange = await self.channel.get_exchange("mlp.events", ensure=False)
        message = aio_pika.Message(
            body,
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            correlation_id=correlation_id,
            message_id=message_id,
        )
        await exchange.publish(message, routing_key=routing_key, mandatory=True)

    async def submit(self, event: dict[str, Any], routing_model: str | None = None) -> str:
        key = f"inference.requested.{routing_model or event['model']}.{event['user_id']}"
        await self.publish(json.dumps(event).encode(), key, event.get("request_id"), event.get("event_id"))
        return str(event.get("request_id"))

    async def outcome(self, request_id: str, timeout_s: float = 60) -> dict[str, Any]:
        async with asyncio.timeout(timeout_s):
            while request_id not in self.outcomes:
                message = await self.queue.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.1)
                    continue
                await message.ack()
                event = json.loads(message.body)
                self.outcomes[event["request_id"]] = event
        return self.outcomes[request_id]


async def _client(platform: Platform, user_id: str) -> tuple[aio_pika.abc.AbstractConnection, BusClient]:
    connection = await aio_pika.connect(platform.namespace.rabbitmq_url)
    channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
    queue = await channel.declare_queue(f"ext.guest.{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
    exchange = await channel.get_exchange("mlp.events", ensure=False)
    for kind in ("completed", "failed", "rejected"):
        await queue.bind(exchange, routing_key=f"inference.{kind}.*.{user_id}")
    return connection, BusClient(channel, queue)


def _read_api(platform: Platform, request_id: str) -> dict[str, Any]:
    response = httpx.get(f"{platform.api_url}/api/v1/inference/{request_id}", params={"wait": 30}, timeout=40)
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


_SAMPLE = re.compile(r"^(nv_inference_request_success|nv_inference_request_failure)\{([^}]*)\}\s+([0-9.e+]+)$")


def triton_requests(triton: TritonProcess, model: str = MODEL) -> float:
    """Inference requests Triton received for ``model`` (successful and failed), from its metrics."""
    total = 0.0
    for line in httpx.get(triton.metrics_url, timeout=10).text.splitlines():
        match = _SAMPLE.match(line)
        if match and f'model="{model}"' in match.group(2):
            total += float(match.group(3))
    return total


async def test_a_request_published_on_the_bus_completes_and_the_read_api_shows_it(platform: Platform) -> None:
    connection, client = await _client(platform, "bus-user")
    async with connection:
        request_id = await client.submit(_request("bus-user"))
        outcome = await client.outcome(request_id)
    assert outcome["type"] == "InferenceCompleted", outcome
    assert outcome["completion"]
    assert outcome["prompt_tokens"] == 2
    shown = await asyncio.to_thread(_read_api, platform, request_id)
    assert shown["status"] == "completed"
    assert shown["result"]["completion"] == outcome["completion"]
    assert shown["usage"]["total_tokens"] == outcome["prompt_tokens"] + outcome["completion_tokens"]


INVALID: dict[str, tuple[str, str]] = {
    # case -> (expected reason, text the detail must contain)
    "bad_schema": ("invalid_request", "max_tokens"),
    "not_json": ("invalid_request", "not a valid InferenceRequested"),
    "missing_event_id": ("invalid_request", "event_id"),
    # The body must match the routing key (which RabbitMQ's topic permissions check).
    "unknown_model_in_body": ("invalid_request", "routing key"),
    "oversize_prompt": ("prompt_too_large", str(LIMITS.max_prompt_chars)),
    "oversize_body": ("invalid_request", "bytes"),
    "max_tokens_too_large": ("max_tokens_too_large", str(LIMITS.max_tokens_limit)),
}


async def _publish_invalid(client: BusClient, case: str, user: str) -> str:
    key = f"inference.requested.{MODEL}.{user}"
    valid = _request(user)
    rid = valid["request_id"]
    match case:
        case "bad_schema":
            await client.submit({**valid, "max_tokens": "ten"})
        case "not_json":
            # No body ids at all: the routing key and the AMQP correlation_id address the rejection.
            await client.publish(b"\x00 definitely not json", key, correlation_id=rid)
        case "missing_event_id":
            await client.submit({k: v for k, v in valid.items() if k != "event_id"})
        case "unknown_model_in_body":
            await client.submit({**valid, "model": "no-such-model"}, routing_model=MODEL)
        case "oversize_prompt":
            await client.submit({**valid, "prompt": "x" * (LIMITS.max_prompt_chars + 1)})
        case "oversize_body":
            await client.submit({**valid, "prompt": "\u0001" * (LIMITS.max_prompt_chars * 2)})
        case "max_tokens_too_large":
            await client.submit({**valid, "max_tokens": LIMITS.max_tokens_limit + 1})
    return str(rid)


async def test_invalid_messages_end_rejected_with_a_reason_and_never_reach_triton(
    platform: Platform, triton_server: TritonProcess
) -> None:
    user = "bus-invalid"
    before = await asyncio.to_thread(triton_requests, triton_server)
    connection, client = await _client(platform, user)
    async with connection:
        ids = {case: await _publish_invalid(client, case, user) for case in INVALID}
        outcomes = {case: await client.outcome(rid) for case, rid in ids.items()}
        assert await asyncio.to_thread(triton_requests, triton_server) == before  # nothing reached Triton

        for case, (reason, fragment) in INVALID.items():
            outcome = outcomes[case]
            assert outcome["type"] == "InferenceRejected", (case, outcome)
            assert outcome["reason"] == reason, (case, outcome)
            assert fragment in outcome["detail"], (case, outcome)
            shown = await asyncio.to_thread(_read_api, platform, ids[case])
            assert shown["status"] == "rejected", (case, shown)

        # The worker kept going: a valid request after all of them completes.
        request_id = await client.submit(_request(user))
        assert (await client.outcome(request_id))["type"] == "InferenceCompleted"
    assert await asyncio.to_thread(triton_requests, triton_server) >= before + 1


async def test_a_message_without_any_request_id_lands_in_the_dead_letter_queue(platform: Platform) -> None:
    connection, client = await _client(platform, "bus-dlq")
    async with connection:
        marker = new_event_id()
        body = json.dumps({"type": "InferenceRequested", "marker": marker}).encode()
        await client.publish(body, f"inference.requested.{MODEL}.bus-dlq")  # no request_id anywhere
        dlq = await client.channel.get_queue(requests_queue(MODEL).dead_letter_queue or "", ensure=False)
        found = False
        async with asyncio.timeout(60):
            while not found:
                message = await dlq.get(fail=False)
                if message is None:
                    await asyncio.sleep(0.2)
                    continue
                found = marker.encode() in message.body
                await (message.ack() if found else message.nack(requeue=True))
        # The worker kept going.
        request_id = await client.submit(_request("bus-dlq"))
        assert (await client.outcome(request_id))["type"] == "InferenceCompleted"


async def test_a_request_for_a_model_nobody_serves_is_rejected(platform: Platform) -> None:
    connection, client = await _client(platform, "bus-unserved")
    async with connection:
        request_id = await client.submit(_request("bus-unserved", model="no-such-model"))
        outcome = await client.outcome(request_id, timeout_s=20)
    assert outcome["type"] == "InferenceRejected"
    assert outcome["reason"] == "unknown_model"


async def test_an_outcome_forged_on_the_requests_key_is_rejected_not_projected(platform: Platform) -> None:
    user = "bus-forger"
    connection, client = await _client(platform, user)
    async with connection:
        valid = _request(user)
        forged = {**valid, "type": "InferenceCompleted", "completion": "forged", "prompt_tokens": 0}
        request_id = await client.submit({**forged, "completion_tokens": 0, "latency_ms": 0.0})
        outcome = await client.outcome(request_id)
    assert outcome["type"] == "InferenceRejected"
    assert "InferenceCompleted" in outcome["detail"]
    shown = await asyncio.to_thread(_read_api, platform, request_id)
    assert shown["status"] == "rejected", shown


_INFERENCES = re.compile(r"^nv_inference_count\{([^}]*)\}\s+([0-9.e+]+)$")


def triton_inferences(triton: TritonProcess, model: str = MODEL) -> float:
    """Inferences Triton ran for ``model``, each row of a batch counted (its metrics: nv_inference_count)."""
    total = 0.0
    for line in httpx.get(triton.metrics_url, timeout=10).text.splitlines():
        match = _INFERENCES.match(line)
        if match and f'model="{model}"' in match.group(1):
            total += float(match.group(2))
    return total


async def _answers_about(
    clients: list[BusClient], request_id: str, count: int, timeout_s: float = 60
) -> list[dict[str, Any]]:
    """The outcomes ``clients`` received about ``request_id`` (its own, and those addressed to their
    publishers about it: correlation_id), once there are ``count`` of them."""
    async with asyncio.timeout(timeout_s):
        while True:
            about = [o for c in clients for o in c.outcomes.values() if o.get("correlation_id") == request_id]
            if len(about) >= count:
                return about
            got = False
            for client in clients:
                message = await client.queue.get(fail=False)
                if message is not None:
                    got = True
                    await message.ack()
                    event = json.loads(message.body)
                    client.outcomes[event["request_id"]] = event
            if not got:
                await asyncio.sleep(0.1)


async def test_a_second_tenant_cannot_kill_anothers_request(platform: Platform) -> None:
    # The attack: on bob's own routing key, a body naming alice's request X with alice's user id.
    alice, bob = "bus-alice", "bus-bob"
    alices = f"{alice}.job-{new_event_id()}"
    alice_conn, alice_client = await _client(platform, alice)
    bob_conn, bob_client = await _client(platform, bob)
    async with alice_conn, bob_conn:
        attack = {"type": "InferenceRequested", "request_id": alices, "user_id": alice, "model": MODEL}
        await bob_client.publish(json.dumps(attack).encode(), f"inference.requested.{MODEL}.{bob}", alices)
        [answer] = await _answers_about([bob_client], alices, 1)
        # alice's valid X, published afterwards, completes as hers.
        request_id = await alice_client.submit(_request(alice, request_id=alices))
        outcome = await alice_client.outcome(request_id)
    assert (answer["type"], answer["reason"], answer["user_id"]) == ("InferenceRejected", "invalid_request", bob)
    assert answer["request_id"].startswith(f"{bob}.rejected-")
    assert outcome["type"] == "InferenceCompleted", outcome
    shown = await asyncio.to_thread(_read_api, platform, alices)
    assert (shown["status"], shown["user_id"]) == ("completed", alice)


async def test_twenty_publishes_of_one_id_with_twenty_prompts_run_at_most_one_inference(
    platform: Platform, triton_server: TritonProcess
) -> None:
    # Two tenants race for one request id with twenty prompts: whoever claims it first runs it, once.
    users = ("bus-alice-20", "bus-bob-20")
    rid = new_event_id()
    (alice_conn, alice_client), (bob_conn, bob_client) = [await _client(platform, u) for u in users]
    async with alice_conn, bob_conn:
        before = await asyncio.to_thread(triton_inferences, triton_server)
        bodies = [(c, _request(u, request_id=rid, prompt=f"{u}'s prompt {i}")) for i in range(10)
                  for c, u in ((alice_client, users[0]), (bob_client, users[1]))]  # fmt: skip
        await asyncio.gather(*(client.submit(body) for client, body in bodies))
        answers = await _answers_about([alice_client, bob_client], rid, 20)
        await asyncio.sleep(2)  # Triton's metrics are scraped, not pushed: let them catch up
        ran = await asyncio.to_thread(triton_inferences, triton_server) - before
    assert ran <= 1, f"{ran} inferences for one request id"
    [outcome] = [a for a in answers if a["request_id"] == rid]
    assert outcome["type"] == "InferenceCompleted", outcome
    refusals = [a for a in answers if a["request_id"] != rid]
    assert len(refusals) == 19
    assert {o["reason"] for o in refusals} == {"duplicate_request_id"}
    assert all(o["request_id"].startswith(f"{o['user_id']}.rejected-") for o in refusals)
    winner = outcome["user_id"]
    shown = await asyncio.to_thread(_read_api, platform, rid)
    assert (shown["status"], shown["user_id"]) == ("completed", winner)
    assert shown["result"]["completion"] == outcome["completion"]
    for user in users:  # the winner is charged once, the other not at all
        quota = httpx.get(f"{platform.api_url}/api/v1/users/{user}/quota", timeout=10).json()
        day = next(w for w in quota["windows"] if w["window"] == "day")
        charged = outcome["prompt_tokens"] + outcome["completion_tokens"] if user == winner else 0
        assert day["used"] == charged, (user, quota)

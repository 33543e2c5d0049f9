"""Cancel and deadlines end to end: real gateway, worker, collector, read API, RabbitMQ, Redis and Triton.

Triton's own statistics count what reached it (``inference_count``), so "never reached Triton" is
checked where it matters, not inferred from the platform's answers.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
import tritonclient.grpc.aio as grpcclient

from events.model import new_event_id
from ml_service.launcher import TritonProcess
from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, running_platform
from tests.support.triton import triton_server
from tests.support.waiting import eventually

pytestmark = pytest.mark.e2e
__all__ = ["triton_server"]

FAST = "basic-model"
SLOW = "slow-model"  # answers after 5 s (triton_models/slow-model/config.pbtxt)
TERMINAL = {"completed", "failed", "rejected", "cancelled", "expired"}


@pytest.fixture(scope="module")
def platform(triton_server: TritonProcess) -> Iterator[Platform]:
    # No worker yet: the first test cancels and expires requests while they wait in the queue.
    extra = {"MLP_MODELS": f"{FAST},{SLOW}"}
    with (
        isolated_namespace("cancel") as ns,
        running_platform(ns, triton_server.grpc_url, ("collector", "api", "gateway"), extra) as running,
    ):
        yield running


@pytest.fixture
def worker(platform: Platform) -> Platform:
    if "worker" not in platform.services:
        platform.start("worker")
    return platform


async def _inferences(triton: TritonProcess, model: str) -> int:
    grpc = grpcclient.InferenceServerClient(triton.grpc_url)
    try:
        stats = (await grpc.get_inference_statistics(model, as_json=True))["model_stats"][0]
    finally:
        await grpc.close()
    return int(stats.get("inference_count", 0))


async def _submit(client: httpx.AsyncClient, platform: Platform, user: str, model: str, **extra: Any) -> str:
    body = {"prompt": "test prompt", "user_id": user, "model": model, "max_tokens": 8, **extra}
    response = await client.post(f"{platform.gateway_url}/api/v1/inference", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["request_id"])


async def _cancel(client: httpx.AsyncClient, platform: Platform, request_id: str) -> httpx.Response:
    return await client.post(f"{platform.gateway_url}/api/v1/inference/{request_id}/cancel")


async def _view(client: httpx.AsyncClient, platform: Platform, request_id: str, wait: float = 0) -> dict[str, Any]:
    response = await client.get(f"{platform.api_url}/api/v1/inference/{request_id}", params={"wait": wait})
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    return view


async def _final(client: httpx.AsyncClient, platform: Platform, request_id: str) -> dict[str, Any]:
    view = await _view(client, platform, request_id, wait=30)
    assert view["status"] in TERMINAL, view
    return view


async def _quota(client: httpx.AsyncClient, platform: Platform, user: str) -> dict[str, Any]:
    response = await client.get(f"{platform.api_url}/api/v1/users/{user}/quota")
    assert response.status_code == 200, response.text
    day: dict[str, Any] = response.json()["windows"][0]
    return day


def _conserved(day: dict[str, Any]) -> None:
    assert day["reserved"] == 0, day
    assert day["used"] + day["reserved"] + day["remaining"] == day["limit"], day


async def _stored(platform: Platform, request_id: str) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(platform.namespace.postgres_dsn)
    try:
        rows = await conn.fetch(
            "SELECT payload::text FROM event_store WHERE request_id = $1 ORDER BY occurred_at, event_id", request_id
        )
        usage = await conn.fetchval("SELECT count(*) FROM token_usage WHERE request_id = $1", request_id)
    finally:
        await conn.close()
    events = [json.loads(r[0]) for r in rows]
    if not any(e["type"] == "InferenceCompleted" for e in events):
        assert usage == 0, f"{request_id} was charged without completing"
    return events


async def _running(client: httpx.AsyncClient, platform: Platform, request_id: str) -> None:
    async def started() -> bool:
        return bool((await _view(client, platform, request_id))["status"] == "running")

    await eventually(started, f"{request_id} running")


async def _bus_publish(platform: Platform, body: dict[str, Any], routing_key: str) -> None:
    connection = await aio_pika.connect(platform.namespace.rabbitmq_url)
    async with connection:
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.get_exchange("mlp.events", ensure=False)
        message = aio_pika.Message(json.dumps(body).encode(), delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
        await exchange.publish(message, routing_key=routing_key, mandatory=True)


async def test_cancelled_or_expired_while_queued_never_reaches_triton(
    platform: Platform, triton_server: TritonProcess
) -> None:
    user = "cancel-queued"
    async with httpx.AsyncClient(timeout=40) as client:
        before = await _inferences(triton_server, FAST)
        cancelled = await _submit(client, platform, user, FAST)
        expiring = await _submit(client, platform, user, FAST, timeout_s=0.5)

        answer = await _cancel(client, platform, cancelled)
        assert answer.status_code == 202, answer.text
        assert answer.json()["status"] == "cancelled"
        assert answer.json()["error"]["code"] == "cancelled"
        again = await _cancel(client, platform, cancelled)  # idempotent
        assert again.status_code == 202, again.text
        assert again.json()["status"] == "cancelled"

        await asyncio.sleep(0.6)  # past the deadline of `expiring` while no worker runs (the point of the test)
        platform.start("worker")
        marker = await _submit(client, platform, user, FAST)  # queued behind both

        assert (await _final(client, platform, marker))["status"] == "completed"
        view = await _final(client, platform, expiring)
        assert view["status"] == "expired", view
        assert view["error"]["code"] == "expired"
        assert view["usage"] is None
        assert view["started_at"] is None
        assert (await _final(client, platform, cancelled))["status"] == "cancelled"
        assert await _inferences(triton_server, FAST) - before == 1  # the marker alone

        for request_id, terminal in ((cancelled, "InferenceCancelled"), (expiring, "InferenceExpired")):
            events = await _stored(platform, request_id)
            assert [e["type"] for e in events] == ["InferenceRequested", terminal], events
            assert events[1]["stage"] == "queued"
        _conserved(await _quota(client, platform, user))


async def test_cancel_while_running_on_slow_model_ends_cancelled_and_charges_nothing(worker: Platform) -> None:
    user = "cancel-running"
    async with httpx.AsyncClient(timeout=40) as client:
        request_id = await _submit(client, worker, user, SLOW)
        await _running(client, worker, request_id)
        answer = await _cancel(client, worker, request_id)
        assert answer.status_code == 202, answer.text
        view = await _final(client, worker, request_id)
        assert view["status"] == "cancelled", view
        assert view["usage"] is None
        assert view["started_at"] is not None
        events = await _stored(worker, request_id)
        assert [e["type"] for e in events] == ["InferenceRequested", "InferenceStarted", "InferenceCancelled"]
        assert events[-1]["stage"] == "running"
        day = await _quota(client, worker, user)
        assert day["used"] == 0, day
        _conserved(day)
        again = await _cancel(client, worker, request_id)
        assert again.status_code == 202, again.text
        assert again.json()["status"] == "cancelled"


async def test_cancel_of_a_finished_request_answers_409_and_an_unknown_one_404(worker: Platform) -> None:
    async with httpx.AsyncClient(timeout=40) as client:
        request_id = await _submit(client, worker, "cancel-done", FAST)
        assert (await _final(client, worker, request_id))["status"] == "completed"
        answer = await _cancel(client, worker, request_id)
        assert answer.status_code == 409, answer.text
        assert answer.json()["error"] == "not_cancellable"
        assert (await _view(client, worker, request_id))["status"] == "completed"
        unknown = await _cancel(client, worker, new_event_id())
        assert unknown.status_code == 404, unknown.text
        assert unknown.json()["error"] == "not_found"


async def test_concurrent_cancel_and_start_end_in_exactly_one_state_with_the_quota_conserved(
    worker: Platform, triton_server: TritonProcess
) -> None:
    user = "cancel-race"
    count = 24
    async with httpx.AsyncClient(timeout=40) as client:
        before = await _inferences(triton_server, FAST)

        async def submit_and_cancel() -> tuple[str, int]:
            request_id = await _submit(client, worker, user, FAST)
            return request_id, (await _cancel(client, worker, request_id)).status_code

        raced = await asyncio.gather(*(submit_and_cancel() for _ in range(count)))
        views = {rid: await _final(client, worker, rid) for rid, _ in raced}
        for request_id, code in raced:
            assert code in (202, 409), (request_id, code)
            assert views[request_id]["status"] in ({"cancelled", "completed"} if code == 202 else {"completed"})

        used = 0
        queued_cancels = running_cancels = 0
        for request_id, view in views.items():
            events = await _stored(worker, request_id)
            terminal = [e for e in events if e["type"] in ("InferenceCompleted", "InferenceCancelled")]
            assert len(terminal) == 1, events  # exactly one terminal event per request
            if view["status"] == "completed":
                used += view["usage"]["total_tokens"]
            elif terminal[0]["stage"] == "queued":
                queued_cancels += 1
            else:
                running_cancels += 1
        completed = count - queued_cancels - running_cancels
        reached = await _inferences(triton_server, FAST) - before
        # every completion ran on Triton; a request cancelled while queued never did
        assert completed <= reached <= completed + running_cancels, (reached, completed, running_cancels)
        day = await _quota(client, worker, user)
        assert day["used"] == used, (day, used)
        _conserved(day)


async def test_a_request_past_its_deadline_on_slow_model_expires_uncharged(worker: Platform) -> None:
    user = "expire-running"
    async with httpx.AsyncClient(timeout=40) as client:
        request_id = await _submit(client, worker, user, SLOW, timeout_s=1.5)
        view = await _final(client, worker, request_id)
        assert view["status"] == "expired", view
        events = await _stored(worker, request_id)
        assert events[-1]["type"] == "InferenceExpired", events
        assert events[-1]["stage"] == "running"
        day = await _quota(client, worker, user)
        assert day["used"] == 0, day
        _conserved(day)
        too_long = await client.post(
            f"{worker.gateway_url}/api/v1/inference",
            json={"prompt": "p", "user_id": user, "model": FAST, "timeout_s": 10 * 86_400},
        )
        assert too_long.status_code == 422, too_long.text


async def test_a_bus_cancel_cancels_its_publishers_request_and_never_another_tenants(worker: Platform) -> None:
    async with httpx.AsyncClient(timeout=40) as client:
        alices = await _submit(client, worker, "alice-bus", SLOW)
        others = await _submit(client, worker, "alice-bus", SLOW)
        await _running(client, worker, alices)
        await _running(client, worker, others)
        # mallory names alice's request on her own routing key: nothing happens to it
        command = {"type": "CancelInference", "request_id": others}
        await _bus_publish(worker, command, f"inference.requested.{SLOW}.mallory")
        await _bus_publish(
            worker, {"type": "CancelInference", "request_id": alices}, f"inference.requested.{SLOW}.alice-bus"
        )

        view = await _final(client, worker, alices)
        assert view["status"] == "cancelled", view
        events = await _stored(worker, alices)
        assert events[-1]["cause"] == "bus", events
        assert (await _final(client, worker, others))["status"] == "completed"


async def test_a_bus_requests_deadline_is_kept_and_bounded_by_the_plan(
    worker: Platform, triton_server: TritonProcess
) -> None:
    now = datetime.now(UTC)
    key = f"inference.requested.{FAST}.deadline-bus"

    def bus_request(occurred_at: datetime, deadline_at: datetime) -> dict[str, Any]:
        return {
            "type": "InferenceRequested",
            "event_id": new_event_id(),
            "request_id": new_event_id(),
            "occurred_at": occurred_at.isoformat(),
            "deadline_at": deadline_at.isoformat(),
            "user_id": "deadline-bus",
            "model": FAST,
            "prompt": "test prompt",
            "max_tokens": 8,
            "source": "bus",
        }

    before = await _inferences(triton_server, FAST)
    past = bus_request(now - timedelta(seconds=10), now - timedelta(seconds=5))  # its deadline has passed
    too_far = bus_request(now, now + timedelta(hours=2))  # the free plan allows 3600 s
    for body in (past, too_far):
        await _bus_publish(worker, body, key)
    async with httpx.AsyncClient(timeout=40) as client:

        async def both_projected() -> bool:
            for body in (past, too_far):
                response = await client.get(f"{worker.api_url}/api/v1/inference/{body['request_id']}")
                if response.status_code != 200:
                    return False
            return True

        await eventually(both_projected, "both bus requests projected")
        expired = await _final(client, worker, past["request_id"])
        assert expired["status"] == "expired", expired
        refused = await _final(client, worker, too_far["request_id"])
        assert refused["status"] == "rejected", refused
        assert "max_timeout_s" in refused["error"]["message"]
    assert await _inferences(triton_server, FAST) == before  # neither reached Triton

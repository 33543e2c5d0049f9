"""Graceful shutdown of the worker: in-flight work finishes, or goes back to the queue (never to the DLQ)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from events.model import InferenceCompleted, InferenceStarted
from events.topology import requests_queue
from ml_service.launcher import TritonProcess
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.settings import Settings
from tests.integration.test_worker_harness import (
    EventLog,
    free_port,
    observed,
    queue_depth,
    requested,
    running_worker,
    wait_queue_depth,
)
from tests.support.isolation import Namespace
from tests.support.triton import triton_server

pytestmark = pytest.mark.integration
__all__ = ["triton_server"]

SLOW_QUEUE = requests_queue("slow-model").name  # slow-model sleeps 5 s per batch


@pytest.fixture(scope="module")
async def slow_settings(migrated: Settings, triton_server: TritonProcess) -> Settings:
    settings = migrated.model_copy(
        update={"triton_url": triton_server.grpc_url, "triton_timeout_s": 30.0, "models": ("slow-model",)}
    )
    broker = make_broker(settings)
    await broker.connect()
    await declare_topology(broker, settings.models)
    await broker.stop()
    return settings


async def _submit(settings: Settings, log: EventLog, user_id: str) -> str:
    request = requested(model="slow-model", user_id=user_id)
    broker = make_broker(settings)
    await broker.connect()
    try:
        await EventPublisher(broker, timeout_s=10).publish(request)
    finally:
        await broker.stop()
    async with asyncio.timeout(120):
        while not any(isinstance(e, InferenceStarted) for e in log.by_request[request.request_id]):
            await asyncio.sleep(0.05)
    return request.request_id


async def test_shutdown_finishes_in_flight_work_within_the_graceful_timeout(slow_settings: Settings) -> None:
    patient = slow_settings.model_copy(update={"graceful_timeout_s": 60.0})
    dlq_before = await queue_depth(slow_settings, SLOW_QUEUE + ".dlq")
    async with observed(slow_settings) as log:
        async with running_worker(patient, models=("slow-model",)):
            request_id = await _submit(slow_settings, log, "patient-user")
        # The stop returned: the outcome was published (and the message acked) before it did.
        events = await log.terminal(request_id)
    assert isinstance(events[-1], InferenceCompleted)
    assert await queue_depth(slow_settings, SLOW_QUEUE) == 0
    assert await queue_depth(slow_settings, SLOW_QUEUE + ".dlq") == dlq_before


async def test_unfinished_work_is_requeued_never_dead_lettered_and_completes_later(slow_settings: Settings) -> None:
    hasty = slow_settings.model_copy(update={"graceful_timeout_s": 0.5})
    dlq_before = await queue_depth(slow_settings, SLOW_QUEUE + ".dlq")
    async with observed(slow_settings) as log:
        async with running_worker(hasty, models=("slow-model",)):
            request_id = await _submit(slow_settings, log, "hasty-user")
        await wait_queue_depth(slow_settings, SLOW_QUEUE, 1)  # back in its queue
        assert not any(isinstance(e, InferenceCompleted) for e in log.by_request[request_id])
        assert await queue_depth(slow_settings, SLOW_QUEUE + ".dlq") == dlq_before
        async with running_worker(slow_settings, models=("slow-model",)):
            events = await log.terminal(request_id)
    completed = [e for e in events if isinstance(e, InferenceCompleted)]
    assert len(completed) == 1
    attempts = [e.attempt for e in events if isinstance(e, InferenceStarted)]
    assert attempts == [1, 2]  # the redelivery is visible as the second attempt


def test_mlp_worker_exits_0_on_sigterm(
    namespace: Namespace, slow_settings: Settings, triton_server: TritonProcess
) -> None:
    port = free_port()
    env = {
        **os.environ,
        **namespace.env(),
        "MLP_TRITON_URL": triton_server.grpc_url,
        "MLP_WORKER_HEALTH_PORT": str(port),
        "MLP_MODELS": "slow-model",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "worker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        deadline = time.monotonic() + 120
        ready = False
        while time.monotonic() < deadline and process.poll() is None and not ready:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.2)
        assert ready, "the worker never became ready"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        assert "mlp_inference_latency_seconds" in metrics
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        output = process.stdout.read().decode(errors="replace") if process.stdout else ""
        print(output[-4000:])

"""The SSE stream end to end with real processes: opened right after the 202, it follows the request
through the worker and the collector to its outcome; resumed on a second read API process, it sends
what came after the client's last event."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest

from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, ServiceProcess, free_port, running_platform
from tests.support.sse import Message, messages

pytestmark = pytest.mark.e2e

SEED = {"prompt": "test prompt", "user_id": "test-user", "model": "basic-model"}


@pytest.fixture(scope="module")
def platform(triton_grpc_url: str) -> Iterator[Platform]:
    # Every request announces its start here (MLP_STARTED_EVENT_AFTER_MS=0): the stream carries three events.
    env = {"MLP_STARTED_EVENT_AFTER_MS": "0"}
    with isolated_namespace("sse") as ns, running_platform(ns, triton_grpc_url, extra_env=env) as running:
        yield running


def _read_to_end(url: str, headers: dict[str, str] | None = None) -> list[Message]:
    with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=60)) as response:
        assert response.status_code == 200, response.read().decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        return messages("".join(response.iter_text()))


def test_a_stream_opened_after_the_202_follows_to_the_outcome_and_resumes_on_another_replica(
    platform: Platform,
) -> None:
    submitted = httpx.post(f"{platform.gateway_url}/api/v1/inference", json=SEED, timeout=10)
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]
    path = f"/api/v1/inference/{request_id}/stream"

    live = _read_to_end(platform.api_url + path)  # ends by itself after the outcome
    assert [m.event for m in live] == ["InferenceRequested", "InferenceStarted", "InferenceCompleted"]
    stored = httpx.get(f"{platform.api_url}/api/v1/inference/{request_id}/events", timeout=10).json()["events"]
    assert [json.loads(m.data) for m in live] == stored
    assert [m.id for m in live] == [e["event_id"] for e in stored]

    port = free_port()
    second = ServiceProcess(
        name="api-2",
        argv=platform.service("api").argv,
        env={**platform.env, "MLP_READ_API_PORT": str(port)},
        ready_url=f"http://127.0.0.1:{port}/readyz",
        log_path=platform.workdir / "api-2.log",
    ).start()
    platform.services["api-2"] = second
    second.wait_ready()
    other = f"http://127.0.0.1:{port}"
    resumed = _read_to_end(other + path, {"Last-Event-ID": live[0].id or ""})
    assert [m.id for m in resumed] == [m.id for m in live[1:]]
    after_end = httpx.get(other + path, headers={"Last-Event-ID": live[-1].id or ""}, timeout=10)
    assert after_end.status_code == 204

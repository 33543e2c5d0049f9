"""End to end with real processes: gateway -> RabbitMQ -> worker -> Triton -> collector -> read API."""

from __future__ import annotations

from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, running_platform

pytestmark = pytest.mark.e2e

SEED = {"prompt": "test prompt", "user_id": "test-user", "model": "basic-model"}


@pytest.fixture(scope="module")
def platform(triton_grpc_url: str) -> Iterator[Platform]:
    with isolated_namespace("e2e") as ns, running_platform(ns, triton_grpc_url) as running:
        yield running


def _wait_terminal(platform: Platform, request_id: str, seconds: float = 30) -> dict[str, object]:
    response = httpx.get(
        f"{platform.api_url}/api/v1/inference/{request_id}", params={"wait": seconds}, timeout=seconds + 5
    )
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_the_seed_request_completes_and_is_recorded(platform: Platform) -> None:
    submitted = httpx.post(f"{platform.gateway_url}/api/v1/inference", json=SEED, timeout=10)
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]

    # A GET right after the 202 never answers 404.
    first = httpx.get(f"{platform.api_url}/api/v1/inference/{request_id}", timeout=10)
    assert first.status_code == 200
    assert first.json()["status"] in {"queued", "running", "completed"}

    final = _wait_terminal(platform, request_id)
    assert final["status"] == "completed", final
    result = final["result"]
    usage = final["usage"]
    assert isinstance(result, dict)
    assert isinstance(usage, dict)
    assert result["completion"]
    assert usage["prompt_tokens"] == 2  # "test prompt" is two WordPiece tokens
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    async def recorded() -> tuple[list[str], list[asyncpg.Record]]:
        conn = await asyncpg.connect(platform.namespace.postgres_dsn)
        try:
            types = [
                r["type"]
                for r in await conn.fetch(
                    "SELECT type FROM event_store WHERE request_id = $1 ORDER BY occurred_at, event_id", request_id
                )
            ]
            usage_rows = await conn.fetch("SELECT * FROM token_usage WHERE request_id = $1", request_id)
            return types, usage_rows
        finally:
            await conn.close()

    import asyncio

    types, usage_rows = asyncio.run(recorded())
    # InferenceStarted only when the inference outlasted MLP_STARTED_EVENT_AFTER_MS (default 50 ms).
    assert [t for t in types if t != "InferenceStarted"] == ["InferenceRequested", "InferenceCompleted"]
    assert types.count("InferenceStarted") <= 1
    assert types[-1] == "InferenceCompleted"
    assert len(usage_rows) == 1
    assert usage_rows[0]["user_id"] == "test-user"
    assert usage_rows[0]["total_tokens"] == usage["total_tokens"]


def test_triton_down_ends_failed_with_a_clear_code(triton_grpc_url: str) -> None:
    from tests.support.services import free_port

    dead_triton = f"127.0.0.1:{free_port()}"  # nothing listens there
    extra = {"MLP_TRITON_TIMEOUT_S": "2", "MLP_TRITON_RETRIES": "1", "MLP_TRITON_BACKOFF_S": "0.1"}
    services = ("collector", "api", "gateway")
    with isolated_namespace("e2e-down") as ns, running_platform(ns, dead_triton, services, extra) as platform:
        platform.start("worker", path="/healthz")  # alive, but not ready: its Triton is down
        submitted = httpx.post(f"{platform.gateway_url}/api/v1/inference", json=SEED, timeout=10)
        assert submitted.status_code == 202
        final = _wait_terminal(platform, submitted.json()["request_id"])
        assert final["status"] == "failed", final
        error = final["error"]
        assert isinstance(error, dict)
        assert error["code"] == "triton_unavailable"

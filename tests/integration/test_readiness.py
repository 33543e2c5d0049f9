"""Readiness means "can serve" (mlp.health): a dependency with a fallback shows as degraded, not unready.

Each dependency is made unreachable for the app under test only: Redis by a URL on a closed port, Postgres
by cutting the TCP proxy the app's DSN goes through. The shared services are never stopped here.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from api_gateway.main import create_app as create_gateway
from mlp.health import assess
from mlp.settings import Settings
from read_api.main import create_app as create_read_api
from tests.support.apps import running
from tests.support.services import free_port
from tests.support.tcp_proxy import TcpProxy, tcp_proxy

pytestmark = pytest.mark.integration


def _through(dsn: str, proxy: TcpProxy) -> str:
    parts = urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{proxy.port}"))


def _postgres_address(dsn: str) -> tuple[str, int]:
    parts = urlsplit(dsn)
    return parts.hostname or "127.0.0.1", parts.port or 5432


def _no_redis(settings: Settings) -> Settings:
    return settings.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0"})


def _gauge(metrics: str, dependency: str) -> str:
    prefix = f'mlp_dependency_up{{dependency="{dependency}"}} '
    return next(line.removeprefix(prefix) for line in metrics.splitlines() if line.startswith(prefix))


async def _readyz(client: httpx.AsyncClient) -> tuple[int, dict[str, object]]:
    response = await client.get("/readyz")
    return response.status_code, response.json()


def test_only_a_required_dependency_makes_a_service_unready() -> None:
    results = {"postgres": True, "redis": False}
    assert assess(results, ("redis",)).ready
    assert assess(results, ("redis",)).status == "degraded"
    assert assess(results, ("redis",)).degraded == ("redis",)
    assert not assess(results).ready
    assert assess(results).failed == ("redis",)
    assert assess({"postgres": True}).status == "ready"


async def test_the_read_api_stays_ready_without_redis_and_says_it_is_degraded(migrated: Settings) -> None:
    async with running(create_read_api(_no_redis(migrated))) as client:
        status, body = await _readyz(client)
        assert status == 200, body
        assert body["status"] == "degraded"
        assert body["degraded"] == ["redis"]
        assert body["checks"] == {"postgres": True, "redis": False}
        metrics = (await client.get("/metrics")).text
        assert _gauge(metrics, "redis") == "0.0"
        assert _gauge(metrics, "postgres") == "1.0"


async def test_the_read_api_is_unready_without_postgres(migrated: Settings) -> None:
    async with tcp_proxy(*_postgres_address(migrated.postgres_dsn)) as proxy:
        settings = migrated.model_copy(update={"postgres_dsn": _through(migrated.postgres_dsn, proxy)})
        async with running(create_read_api(settings)) as client:
            status, body = await _readyz(client)
            assert (status, body["status"], body["degraded"]) == (200, "ready", [])
            await proxy.cut()
            status, body = await _readyz(client)
            assert status == 503, body
            assert body["status"] == "unready"
            assert body["checks"] == {"postgres": False, "redis": True}
            assert _gauge((await client.get("/metrics")).text, "postgres") == "0.0"


async def test_the_gateway_stays_ready_without_postgres_and_is_unready_without_redis(migrated: Settings) -> None:
    async with tcp_proxy(*_postgres_address(migrated.postgres_dsn)) as proxy:
        settings = migrated.model_copy(update={"postgres_dsn": _through(migrated.postgres_dsn, proxy)})
        async with running(create_gateway(settings)) as client:
            await proxy.cut()
            status, body = await _readyz(client)
            assert status == 200, body
            assert (body["status"], body["degraded"]) == ("degraded", ["postgres"])
    # Every admission is a Redis script (no fallback): without Redis the gateway cannot accept anything.
    async with running(create_gateway(_no_redis(migrated))) as client:
        status, body = await _readyz(client)
        assert status == 503, body
        assert body["status"] == "unready"
        assert body["checks"] == {"rabbitmq": True, "postgres": True, "redis": False}

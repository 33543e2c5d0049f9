"""Composition root of the read API (``mlp api``): status, results, event streams (SSE), quota, usage and the
token-rate metric."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI

from events.model import utc_now
from mlp import telemetry
from mlp.cache import create_redis
from mlp.db import create_pool
from mlp.health import dependency_checks
from mlp.http import run_service, service_app
from mlp.settings import Settings
from projections.queue_position import QueuePositions
from projections.status_cache import StatusCache, StatusKeys
from quota.service import QuotaService, QuotaSettings
from read_api import (
    metrics_routes,
    quota_routes,
    request_events_routes,
    request_list_routes,
    requests_routes,
    stream_routes,
)
from read_api.deps import ReadApiDeps
from read_api.event_feed import EventFeed
from read_api.terminal_waits import TerminalWaits
from tenancy.authenticator import Authenticator
from tenancy.http import add_auth_handlers
from tenancy.key_store import KeyStore
from tenancy.keys import pepper_of

SERVICE = "read-api"
# Readiness (mlp.health): the read API serves without Redis (statuses and waits fall back to Postgres), never
# without Postgres. A Redis restart so leaves every replica in its Service, degraded.
DEGRADABLE = ("redis",)


def create_app(settings: Settings, clock: Callable[[], datetime] = utc_now) -> FastAPI:
    """``clock`` dates key checks (tests move it to pass an expiry or a grace period)."""
    pepper = pepper_of(settings)  # production without a usable pepper stops here, saying how to fix it
    tel = telemetry.setup_telemetry(SERVICE, settings)
    telemetry.instrument_clients(tel)  # before the Redis client exists

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis_client = create_redis(settings)
        pool = await create_pool(settings, max_size=10)
        authenticator = Authenticator(settings, KeyStore(pool, pepper), clock)
        await authenticator.start()
        status_cache = StatusCache(redis_client, StatusKeys(settings.redis_prefix))
        terminal_waits = TerminalWaits(redis_client, status_cache, settings.max_waits_per_caller)
        terminal_waits.start()
        event_feed = EventFeed.for_dsn(settings.postgres_dsn, settings.max_streams_per_caller)
        event_feed.start()
        app.state.on_exit_signal = event_feed.stop_streams  # SIGTERM: streams end, clients resume elsewhere
        app.state.deps = ReadApiDeps(
            settings=settings,
            pool=pool,
            status_cache=status_cache,
            terminal_waits=terminal_waits,
            event_feed=event_feed,
            queue_positions=QueuePositions(redis_client),
            quota=QuotaService(pool, redis_client, QuotaSettings.of(settings)),
            authenticator=authenticator,
        )
        app.state.readiness = dependency_checks(pool=pool, redis_client=redis_client)
        try:
            yield
        finally:
            await event_feed.close()
            await terminal_waits.close()
            await authenticator.close()
            await redis_client.aclose()
            await pool.close()
            tel.shutdown()

    app = service_app("inference-platform read API", lifespan, tel, degradable=DEGRADABLE)
    app.include_router(request_list_routes.router)
    app.include_router(requests_routes.router)
    app.include_router(request_events_routes.router)
    app.include_router(stream_routes.router)
    app.include_router(quota_routes.router)
    app.include_router(metrics_routes.router)
    add_auth_handlers(app)
    return app


def main(argv: list[str]) -> int:
    return run_service(
        argv,
        service=SERVICE,
        prog="mlp api",
        description="Run the read API.",
        create_app=create_app,
        address=lambda s: (s.read_api_host, s.read_api_port),
    )

"""Composition root of the read API (``mlp api``): status, results, quota, usage and the token-rate metric."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from mlp import telemetry
from mlp.cache import Keys, create_redis
from mlp.db import create_pool
from mlp.health import add_health_routes, dependency_checks, lifespan_checks
from mlp.http import native_telemetry, run_service
from mlp.settings import Settings
from projections.status_cache import StatusCache
from quota.service import QuotaService
from read_api import metrics_routes, quota_routes, requests_routes
from read_api.terminal_waits import TerminalWaits

SERVICE = "read-api"


def create_app(settings: Settings) -> FastAPI:
    tel = telemetry.setup_telemetry(SERVICE, settings)
    telemetry.instrument_clients(tel)  # before the Redis client exists

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis_client = create_redis(settings)
        pool = await create_pool(settings, max_size=10)
        app.state.settings = settings
        app.state.pool = pool
        app.state.redis = redis_client
        app.state.status_cache = StatusCache(redis_client, Keys(settings.redis_prefix))
        app.state.terminal_waits = TerminalWaits(redis_client, app.state.status_cache)
        app.state.terminal_waits.start()
        app.state.quota = QuotaService(pool, redis_client, settings)
        app.state.readiness = dependency_checks(pool=pool, redis_client=redis_client)
        try:
            yield
        finally:
            await app.state.terminal_waits.close()
            await redis_client.aclose()
            await pool.close()
            tel.shutdown()

    app = FastAPI(
        title="inference-platform read API",
        version="0.1.0",
        lifespan=lifespan,
        telemetry=native_telemetry(tel.enabled),
    )
    app.include_router(requests_routes.router)
    app.include_router(quota_routes.router)
    app.include_router(metrics_routes.router)
    add_health_routes(app, lifespan_checks(app))
    telemetry.instrument_fastapi(app, tel)
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

"""Composition root of the API gateway (``mlp gateway``): wires settings, broker, Redis, Postgres and quota."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from api_gateway.auth import parse_api_keys
from api_gateway.deps import GatewayDeps
from api_gateway.routes import count_invalid_body, router
from api_gateway.schemas import document_limits
from api_gateway.submit import SubmitService
from mlp import telemetry
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.cache import create_redis
from mlp.db import create_pool
from mlp.health import dependency_checks
from mlp.http import BodySizeLimit, complete_openapi, run_service, service_app
from mlp.settings import Settings
from quota.service import QuotaService

SERVICE = "api-gateway"


def create_app(settings: Settings) -> FastAPI:
    tel = telemetry.setup_telemetry(SERVICE, settings)
    telemetry.instrument_clients(tel)  # before the Redis client exists
    broker = make_broker(settings, middlewares=telemetry.broker_middlewares(tel), app_id=SERVICE)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.connect()
        await declare_topology(broker, settings.models)
        redis_client = create_redis(settings)
        pool = await create_pool(settings, max_size=5)
        quota = QuotaService(pool, redis_client, settings)
        app.state.deps = GatewayDeps(
            settings=settings,
            submit=SubmitService(settings, EventPublisher(broker, settings.publish_timeout_s), quota, redis_client),
            api_keys=parse_api_keys(settings.api_keys),
        )
        app.state.readiness = dependency_checks(broker=broker, pool=pool, redis_client=redis_client)
        try:
            yield
        finally:
            await broker.stop()
            await redis_client.aclose()
            await pool.close()
            tel.shutdown()

    app = service_app("inference-platform gateway", lifespan, tel)
    app.include_router(router)
    app.add_exception_handler(RequestValidationError, count_invalid_body)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    complete_openapi(app, lambda schema: document_limits(schema, settings))
    return app


def main(argv: list[str]) -> int:
    return run_service(
        argv,
        service=SERVICE,
        prog="mlp gateway",
        description="Run the API gateway.",
        create_app=create_app,
        address=lambda s: (s.gateway_host, s.gateway_port),
    )

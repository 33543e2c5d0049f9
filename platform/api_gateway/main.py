"""Composition root of the API gateway (``mlp gateway``): wires settings, broker, Redis, Postgres and quota."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError

from api_gateway import keys_routes, webhook_routes
from api_gateway.cancel import CancelService
from api_gateway.deps import GatewayDeps, WebhookDeps
from api_gateway.routes import count_invalid_body, count_refused_auth, router
from api_gateway.schemas import document_limits
from api_gateway.submit import SubmitService, SubmitSettings
from api_gateway.submit_fast_path import SubmitFastPath
from events.model import utc_now
from ml_service.tokens import TokenCounter
from mlp import metrics, telemetry
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.cache import create_redis
from mlp.db import create_pool
from mlp.health import dependency_checks
from mlp.http import BodySizeLimit, complete_openapi, run_service, service_app
from mlp.settings import Settings
from projections.status_cache import StatusCache, StatusKeys
from quota.limits_follower import LimitsFollower
from quota.service import QuotaService, QuotaSettings
from tenancy.authenticator import Authenticator
from tenancy.http import AuthRefused
from tenancy.key_store import KeyStore
from tenancy.keys import pepper_of
from webhooks.ssrf import TargetGuard
from webhooks.store import PostgresTargets

SERVICE = "api-gateway"
# Readiness (mlp.health): the gateway serves through a Postgres outage (the last known limits and key answers,
# quota.service and tenancy.authenticator), never without the broker (nothing can be accepted) nor without
# Redis (every admission is one Redis script: rate window, first status, request claim; there is no fallback,
# so submits would answer 503 dependency_unavailable anyway).
DEGRADABLE = ("postgres",)


def create_app(settings: Settings, clock: Callable[[], datetime] = utc_now) -> FastAPI:
    """``clock`` dates key checks and changes (tests move it to pass an expiry or a grace period)."""
    pepper = pepper_of(settings)  # production without a usable pepper stops here, saying how to fix it
    tel = telemetry.setup_telemetry(SERVICE, settings)
    telemetry.instrument_clients(tel)  # before the Redis client exists
    broker = make_broker(settings, middlewares=telemetry.broker_middlewares(tel), app_id=SERVICE)
    guard = TargetGuard(allow_private=settings.webhook_allow_private)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await broker.connect()
        await declare_topology(broker, settings.models, verify_only=settings.topology == "verify")
        redis_client = create_redis(settings)
        pool = await create_pool(settings, max_size=5)
        quota = QuotaService(pool, redis_client, QuotaSettings.of(settings))
        limits_follower = LimitsFollower.for_dsn(quota, settings.postgres_dsn)
        limits_follower.start()
        authenticator = Authenticator(settings, KeyStore(pool, pepper), clock)
        await authenticator.start()
        publisher = EventPublisher(broker, settings.publish_timeout_s)
        status_keys = StatusKeys(settings.redis_prefix)
        status_cache = StatusCache(redis_client, status_keys)
        app.state.deps = GatewayDeps(
            settings=settings,
            submit=SubmitService(
                SubmitSettings.of(settings),
                publisher,
                quota,
                redis_client,
                status_cache,
                TokenCounter(settings.model_specs()),
                targets=PostgresTargets(pool),
            ),
            authenticator=authenticator,
            cancel=CancelService(publisher, quota, status_cache, status_keys, pool),
            webhooks=WebhookDeps(pool, guard, settings.webhook_max_per_user),
        )
        app.state.readiness = dependency_checks(broker=broker, pool=pool, redis_client=redis_client)
        for model in settings.models:  # the bound the policy applies (ops.rabbitmq_policy), shown in /metrics
            metrics.QUEUE_MAX_LENGTH.labels(model=model).set(settings.max_queued_per_model)
        try:
            yield
        finally:
            await broker.stop()
            await limits_follower.close()
            await authenticator.close()
            await redis_client.aclose()
            await pool.close()
            tel.shutdown()

    app = service_app("inference-platform gateway", lifespan, tel, degradable=DEGRADABLE)
    app.include_router(router)
    app.include_router(keys_routes.router)
    app.include_router(webhook_routes.router)
    app.add_exception_handler(RequestValidationError, count_invalid_body)
    app.add_exception_handler(AuthRefused, count_refused_auth)
    if not tel.enabled:  # with tracing on, every submit keeps the route's server span
        app.add_middleware(SubmitFastPath)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)  # added last: outside the fast path
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

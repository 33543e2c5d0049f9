"""A small HTTP side server for services without an HTTP API of their own (worker, collector).

Serves ``/healthz`` (the process is alive), ``/readyz`` (the service can do its job) and
``/metrics`` (Prometheus text format of the given registry; ``mlp_build_info`` names the version).

Readiness means "can serve": every dependency check runs, but only a *required* one failing makes the
service unready (503). A *degradable* dependency is one the service has a fallback for (the read API reads
Postgres when Redis is away; the gateway keeps its last known limits and keys through a Postgres outage):
its failure shows in the body (``"status": "degraded", "degraded": ["redis"]``) and in ``mlp_dependency_up``,
never as unready, so a shared service's restart does not take every pod out of its Service.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass

import asyncpg
import redis.asyncio as redis
import uvicorn
from fastapi import FastAPI, Response
from faststream.rabbit import RabbitBroker
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

from mlp.metrics import DEPENDENCY_UP  # (importing mlp.metrics registers mlp_build_info too)

ReadinessCheck = Callable[[], Awaitable[bool]]
# A mapping, or a function returning one (when the checks exist only after a lifespan started).
Checks = Mapping[str, ReadinessCheck] | Callable[[], Mapping[str, ReadinessCheck]]


async def run_checks(checks: Mapping[str, ReadinessCheck], timeout_s: float = 2.0) -> dict[str, bool]:
    async def one(check: ReadinessCheck) -> bool:
        try:
            return await asyncio.wait_for(check(), timeout_s)
        except Exception:
            return False

    results = await asyncio.gather(*(one(c) for c in checks.values()))
    return dict(zip(checks, results, strict=True))


@dataclass(frozen=True, slots=True)
class Readiness:
    """What ``/readyz`` answers, decided from the checks' results (``assess``)."""

    ready: bool
    degraded: tuple[str, ...]  # failed checks the service has a fallback for
    failed: tuple[str, ...]  # failed checks it cannot serve without

    @property
    def status(self) -> str:
        return "unready" if not self.ready else "degraded" if self.degraded else "ready"


def assess(results: Mapping[str, bool], degradable: Collection[str] = ()) -> Readiness:
    """Ready unless a check outside ``degradable`` failed; the degradable ones that failed are named."""
    down = [name for name, ok in results.items() if not ok]
    degraded = tuple(name for name in down if name in degradable)
    failed = tuple(name for name in down if name not in degradable)
    return Readiness(ready=not failed, degraded=degraded, failed=failed)


def dependency_checks(
    *, broker: RabbitBroker | None = None, pool: asyncpg.Pool | None = None, redis_client: redis.Redis | None = None
) -> dict[str, ReadinessCheck]:
    """The readiness checks of the data services a service uses (RabbitMQ, Postgres, Redis)."""
    checks: dict[str, ReadinessCheck] = {}
    if broker is not None:

        async def rabbitmq() -> bool:
            return await broker.ping(timeout=1.0)

        checks["rabbitmq"] = rabbitmq
    if pool is not None:

        async def postgres() -> bool:
            return bool(await pool.fetchval("SELECT 1") == 1)

        checks["postgres"] = postgres
    if redis_client is not None:

        async def redis_ping() -> bool:
            return bool(await redis_client.ping())

        checks["redis"] = redis_ping
    return checks


def lifespan_checks(app: FastAPI) -> Callable[[], Mapping[str, ReadinessCheck]]:
    """Checks the lifespan stores in ``app.state.readiness``; not ready until it has."""

    def current() -> Mapping[str, ReadinessCheck]:
        checks: Mapping[str, ReadinessCheck] | None = getattr(app.state, "readiness", None)
        return checks or {"startup": _not_started}

    return current


async def _not_started() -> bool:
    return False


def add_health_routes(
    app: FastAPI, checks: Checks, registry: CollectorRegistry = REGISTRY, *, degradable: Collection[str] = ()
) -> None:
    """``degradable``: the checks whose failure the service serves through (see the module docstring)."""

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    async def readyz(response: Response) -> dict[str, object]:
        results = await run_checks(checks() if callable(checks) else checks)
        for name, ok in results.items():
            DEPENDENCY_UP.labels(dependency=name).set(1 if ok else 0)
        readiness = assess(results, degradable)
        response.status_code = 200 if readiness.ready else 503
        return {
            "ready": readiness.ready,
            "status": readiness.status,
            "degraded": list(readiness.degraded),
            "checks": results,
        }

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@contextlib.asynccontextmanager
async def health_server(
    host: str, port: int, checks: Checks, registry: CollectorRegistry = REGISTRY
) -> AsyncIterator[None]:
    """Run the side server for the lifetime of the context (inside a service's lifespan)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    add_health_routes(app, checks, registry)
    server = uvicorn.Server(
        uvicorn.Config(
            app, host=host, port=port, log_level="warning", lifespan="off", access_log=False, log_config=None
        )
    )
    # The service owns the signals (uvicorn would otherwise capture SIGTERM for itself).
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    task = asyncio.create_task(server.serve())
    try:
        yield
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=5)

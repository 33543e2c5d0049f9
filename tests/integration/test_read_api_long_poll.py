"""Long-poll limits on the read API, in-process against the real Redis and Postgres: waits are capped per
caller, and a flood of waits on unknown ids neither floods Postgres nor slows /readyz or the token rate."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as redis

from events.model import new_event_id
from mlp.settings import Settings
from projections.status_cache import StatusCache, StatusKeys
from read_api.deps import pool_of
from read_api.main import create_app
from read_api.requests_routes import POSTGRES_RECHECK_S, next_recheck_s
from read_api.terminal_waits import TerminalWaits, wait_key
from tenancy.caller import OPEN, Caller
from tests.support.apps import running

pytestmark = pytest.mark.integration


def terminal_waits_of_app(app: Any) -> TerminalWaits:
    waits: TerminalWaits = app.state.deps.terminal_waits
    return waits


def _client(app: Any, address: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(address, 40_000))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=30)


async def test_waits_beyond_the_callers_cap_answer_429_and_free_slots_are_reused(module_settings: Settings) -> None:
    settings = module_settings.model_copy(update={"max_waits_per_caller": 2, "max_wait_s": 5})
    app = create_app(settings)
    async with running(app), _client(app, "10.1.1.1") as one, _client(app, "10.1.1.2") as other:
        held = [asyncio.create_task(one.get(f"/api/v1/inference/{new_event_id()}", params={"wait": 4})) for _ in "ab"]
        waits = terminal_waits_of_app(app)
        deadline = time.monotonic() + 10
        while waits.held("addr:10.1.1.1") < 2:  # both are waiting now (a loaded machine takes its time)
            assert time.monotonic() < deadline, "the two long-polls never took their slots"
            await asyncio.sleep(0.02)
        over = await one.get(f"/api/v1/inference/{new_event_id()}", params={"wait": 1})
        not_waiting = await one.get(f"/api/v1/inference/{new_event_id()}")  # a plain GET holds no slot
        someone_else = await other.get(f"/api/v1/inference/{new_event_id()}", params={"wait": 0.2})
        assert over.status_code == 429, over.text
        assert over.json()["error"] == "too_many_waits"
        assert int(over.headers["Retry-After"]) >= 1
        assert not_waiting.status_code == 404
        assert someone_else.status_code == 404  # another caller has slots of its own
        assert [(await t).status_code for t in held] == [404, 404]
        again = await one.get(f"/api/v1/inference/{new_event_id()}", params={"wait": 0.2})
        assert again.status_code == 404  # the slots were given back


def test_the_cap_counts_per_user_then_key_then_address() -> None:
    assert wait_key(Caller(user_id="alice", scope="user", key_id="k1"), "10.0.0.1") == "user:alice"
    assert wait_key(Caller(user_id="alice", scope="user", key_id="k2"), "10.0.0.2") == "user:alice"
    assert wait_key(Caller(user_id=None, scope="admin", key_id="k3"), "10.0.0.1") == "key:k3"
    assert wait_key(OPEN, "10.0.0.1") == "addr:10.0.0.1"


def test_an_unknown_id_is_rechecked_on_a_backing_off_timer() -> None:
    sleeps = [0.0]
    for _ in range(6):
        sleeps.append(next_recheck_s(False, sleeps[-1]))
    assert sleeps[1:] == [0.5, 1.0, 2.0, 4.0, POSTGRES_RECHECK_S, POSTGRES_RECHECK_S]
    assert next_recheck_s(True, 4.0) == 0.5  # a known request is re-read at the normal pace


class RequestReads:
    """Counts the statements that read ``inference_requests`` on the connections of one pool."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, record: Any) -> None:
        if "inference_requests" in record.query:
            self.count += 1

    async def init(self, connection: asyncpg.Connection) -> None:
        connection.add_query_logger(self)


@pytest.fixture
async def counted_pool(module_settings: Settings) -> AsyncIterator[tuple[asyncpg.Pool, RequestReads]]:
    reads = RequestReads()
    pool = await asyncpg.create_pool(module_settings.postgres_dsn, min_size=1, max_size=10, init=reads.init)
    assert pool is not None
    yield pool, reads
    await pool.close()


async def test_a_flood_of_waits_on_unknown_ids_spares_postgres_and_readiness(
    module_settings: Settings, counted_pool: tuple[asyncpg.Pool, RequestReads]
) -> None:
    pool, reads = counted_pool
    waiters, wait_s = 300, 3.0
    settings = module_settings.model_copy(update={"max_waits_per_caller": 10_000, "max_wait_s": 10.0})
    app = create_app(settings)
    app.dependency_overrides[pool_of] = lambda: pool  # the routes' pool, counted; /readyz keeps the lifespan's
    known = new_event_id()
    cache_client = redis.Redis.from_url(settings.redis_url, decode_responses=True)
    cache = StatusCache(cache_client, StatusKeys(settings.redis_prefix))
    await cache.advance(known, "queued", {"user_id": "u", "model": "m"})
    await cache_client.aclose()
    async with running(app) as client:
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://testserver", timeout=30, limits=limits
        ) as flood_client:
            flood = [
                asyncio.create_task(flood_client.get(f"/api/v1/inference/{new_event_id()}", params={"wait": wait_s}))
                for _ in range(waiters)
            ]
            await asyncio.sleep(0.5)  # every waiter is in its loop now
            probes: list[tuple[float, str, int, float]] = []
            began = time.monotonic()
            while not all(t.done() for t in flood):
                for path in ("/readyz", "/api/v1/metrics/token-rate", f"/api/v1/inference/{known}"):
                    started = time.monotonic()
                    response = await client.get(path)
                    probes.append((started - began, path, response.status_code, time.monotonic() - started))
                await asyncio.sleep(0.2)
            answers = [await t for t in flood]
    assert [a.status_code for a in answers] == [404] * waiters
    assert probes
    assert all(status == 200 for _, _, status, _ in probes), probes
    # Within the readiness checks' own timeout (mlp.health.run_checks: 2 s), on a machine whose two cores
    # also run the 300 in-process clients; typically under 0.3 s.
    slow = [(round(at, 2), path, round(seconds, 3)) for at, path, _, seconds in probes if seconds >= 2.0]
    assert not slow, slow
    # Each waiter read Postgres once (its first read), not on every tick: 3 s at 0.5 s ticks was 7 reads each.
    assert reads.count <= waiters + 10, reads.count

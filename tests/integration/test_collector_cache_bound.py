"""The collector's memory is bounded in bytes while Redis is away: its status cache backlog (the cache is
resynced from Postgres once Redis answers again) and its follow-up queue (quota commits shed at the bound,
refusals wait for room). Redis goes away for the collector's client only: it reaches Redis through
a proxy the test closes (the shared Redis keeps running)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest
import redis.asyncio as redis
from msgspec.structs import replace
from prometheus_client import REGISTRY

from events.model import AnyEvent, InferenceCompleted, InferenceRequested
from events.request_rules import Rejection
from mlp.backoff import Backoff
from mlp.bus import EventPublisher, declare_topology, make_broker
from mlp.cache import create_redis
from mlp.settings import Settings
from projections.postgres import store_and_project
from projections.sample_events import request_stream
from projections.status_cache import StatusCache, StatusKeys
from quota.service import QuotaService, QuotaSettings
from results_collector.cache_sync import CacheSync, PostgresBackfill
from results_collector.follow_up import FollowUp
from tests.support.services import free_port
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

pytestmark = pytest.mark.integration

COMPLETION_CHARS = 32 * 1024


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    away = TcpProxy(free_port(), "127.0.0.1", 6379)  # closed until the test opens it: nothing listens there
    yield away
    await away.close()


@pytest.fixture
async def through_proxy(proxy: TcpProxy, migrated: Settings) -> AsyncIterator[redis.Redis]:
    client = create_redis(migrated.model_copy(update={"redis_url": f"redis://{proxy.url_host}/0"}))
    yield client
    await client.aclose()


def _large_streams(n: int, tag: str) -> list[list[AnyEvent]]:
    streams = []
    for i in range(n):
        events = request_stream(f"alice.bound-{tag}-{i}")
        completed = events[-1]
        assert isinstance(completed, InferenceCompleted)
        events[-1] = replace(completed, completion=f"{i}:" + "x" * COMPLETION_CHARS)
        streams.append(events)
    return streams


def _dropped() -> float:
    return REGISTRY.get_sample_value("mlp_collector_cache_dropped_total") or 0.0


async def _feed_while_away(sync: CacheSync, pool: asyncpg.Pool, streams: list[list[AnyEvent]], max_bytes: int) -> None:
    """Each stream stored in Postgres, then its updates queued, as the collector does; the bound always holds."""
    for events in streams:
        new = await store_and_project(pool, events)
        assert len(new) == len(events)
        sync.push(new)
        assert sync.held_bytes <= max_bytes


async def _resynced(real: redis.Redis, keys: StatusKeys, streams: list[list[AnyEvent]], sync: CacheSync) -> None:
    async def every_entry_is_the_truth() -> bool:
        for events in streams:
            completed = events[-1]
            assert isinstance(completed, InferenceCompleted)
            entry = await real.hgetall(keys.status(completed.request_id))
            if entry.get("status") != "completed" or entry.get("completion") != completed.completion:
                return False
        return sync.backlog == 0 and not sync.needs_resync

    await eventually(every_entry_is_the_truth, "the cache holds every request as Postgres does")


@pytest.mark.parametrize(("max_bytes", "whole"), [(1024 * 1024, False), (64 * 1024, True)])
async def test_with_redis_away_the_backlog_stays_within_its_bytes_and_the_cache_is_resynced_after(
    proxy: TcpProxy,
    through_proxy: redis.Redis,
    client: redis.Redis,
    pool: asyncpg.Pool,
    migrated: Settings,
    max_bytes: int,
    whole: bool,
) -> None:
    # 1 MiB: the dropped updates' ids are kept and backfilled; 64 KiB: too many ids, the whole cache is.
    keys = StatusKeys(migrated.redis_prefix)
    cache = StatusCache(through_proxy, keys)
    sync = CacheSync(cache, PostgresBackfill(pool, cache), max_bytes=max_bytes, backoff=Backoff(base_s=0.05, cap_s=0.2))
    streams = _large_streams(120, uuid.uuid4().hex[:8])  # ~8 MiB of completions, ten times the larger bound
    dropped = _dropped()
    sync.start()
    try:
        await _feed_while_away(sync, pool, streams, max_bytes)
        assert _dropped() > dropped
        assert sync.needs_resync
        assert await client.exists(keys.status(streams[0][0].request_id)) == 0  # nothing reached Redis
        gauge = REGISTRY.get_sample_value("mlp_collector_cache_backlog_bytes")
        assert gauge is not None
        assert 0 < gauge <= max_bytes
        pending = REGISTRY.get_sample_value("mlp_collector_cache_resync_pending")
        assert (pending == -1) is whole

        await proxy.open()  # Redis answers again
        await _resynced(client, keys, streams, sync)
    finally:
        await sync.close(timeout_s=5)


def _shed() -> float:
    return REGISTRY.get_sample_value("mlp_collector_follow_up_shed_total") or 0.0


async def test_with_redis_away_the_follow_up_queue_stays_within_its_bytes_and_a_refusal_waits_for_room(
    proxy: TcpProxy, through_proxy: redis.Redis, pool: asyncpg.Pool, migrated: Settings
) -> None:
    max_bytes = 256 * 1024
    broker = make_broker(migrated, app_id="test-follow-up")
    await broker.connect()
    await declare_topology(broker, migrated.models)
    quota = QuotaService(pool, through_proxy, QuotaSettings.of(migrated))
    # No model served here: the collector answers the refusals of every model.
    follow_up = FollowUp(EventPublisher(broker, timeout_s=5), quota, served_models=(), max_bytes=max_bytes)
    follow_up.start()
    shed = _shed()
    try:
        completions = [events[-1] for events in _large_streams(40, uuid.uuid4().hex[:8])]  # ~1.3 MiB
        for completed in completions:
            follow_up.push([completed])  # their commits fail while Redis is away: they stay queued
            assert follow_up.held_bytes <= max_bytes
        assert _shed() > shed
        assert follow_up.held_bytes > max_bytes // 2

        first = request_stream(f"alice.bound-refused-{uuid.uuid4().hex[:8]}")[0]
        assert isinstance(first, InferenceRequested)
        request = replace(first, prompt="p" * (max_bytes // 2))  # more than the room left
        refusal = asyncio.create_task(follow_up.refuse(request, Rejection("unknown_model", "not served here")))
        for _ in range(10):
            await asyncio.sleep(0)
        assert not refusal.done(), "a refusal waits for room instead of growing the queue"

        await proxy.open()  # Redis answers: the commits go through, the refusal gets its place and its answer
        assert await asyncio.wait_for(refusal, timeout=60) is True

        async def drained() -> bool:
            return follow_up.held_bytes == 0

        await eventually(drained, "the follow-up queue drained")
    finally:
        await follow_up.close(timeout_s=5)
        await broker.stop()

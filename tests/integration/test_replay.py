"""``mlp replay``: the read models rebuilt from the event store equal the live ones (on a database of its own)."""

from __future__ import annotations

import asyncio
import io
import random
import uuid
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from events.model import AnyEvent
from mlp.cache import create_redis
from mlp.db import drop_database
from mlp.settings import Settings, get_settings
from ops.replay import main
from projections.migrate import migrate
from projections.postgres import LIVE, apply_batch
from projections.projector import UpsertRequest, plan_events
from projections.replay import replay
from projections.sample_events import Outcome, request_stream
from projections.status_cache import StatusCache, StatusKeys, cache_update

pytestmark = pytest.mark.integration

OUTCOMES: tuple[Outcome, ...] = ("completed", "failed", "rejected", "running", "queued", "cancelled", "expired")


@pytest.fixture
async def own_db(settings: Settings) -> AsyncIterator[Settings]:
    """Replay swaps every read model: give it a database no other test reads."""
    parts = urlsplit(settings.postgres_dsn)
    dsn = urlunsplit(parts._replace(path=f"{parts.path}_replay_{uuid.uuid4().hex[:6]}"))
    await migrate(dsn)
    try:
        yield settings.model_copy(update={"postgres_dsn": dsn, "redis_prefix": f"{settings.redis_prefix}replay:"})
    finally:
        await drop_database(dsn)


def _streams(n: int, label: str) -> dict[str, list[AnyEvent]]:
    return {
        f"{label}-{i}": request_stream(f"{label}-{i}", user_id=f"u{i % 5}", outcome=OUTCOMES[i % 5], attempts=1 + i % 2)
        for i in range(n)
    }


async def _live_traffic(conn: asyncpg.Pool, events: list[AnyEvent], seed: int) -> None:
    """Apply events as collectors would: shuffled, in small batches, with redeliveries."""
    rng = random.Random(seed)
    wire = events + rng.sample(events, len(events) // 3)
    rng.shuffle(wire)
    for i in range(0, len(wire), 37):
        await apply_batch(conn, wire[i : i + 37])


async def _snapshot(pool: asyncpg.Pool) -> dict[str, list[tuple[object, ...]]]:
    snap: dict[str, list[tuple[object, ...]]] = {}
    for table in LIVE.all():
        rows = await pool.fetch(f"SELECT * FROM {table}")
        snap[table] = sorted((tuple(r) for r in rows), key=repr)
    schema = await pool.fetch(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE tablename = ANY($1::text[])", list(LIVE.all())
    )
    snap["indexes"] = sorted(tuple(r) for r in schema)
    constraints = await pool.fetch(
        "SELECT conrelid::regclass::text, conname, contype::text FROM pg_constraint"
        " WHERE conrelid::regclass::text = ANY($1::text[])",
        list(LIVE.all()),
    )
    snap["constraints"] = sorted(tuple(r) for r in constraints)
    return snap


async def test_replay_equals_live_and_repairs_damaged_models_and_cache(own_db: Settings) -> None:
    streams = _streams(150, f"rp{uuid.uuid4().hex[:6]}")
    events = [e for s in streams.values() for e in s]
    pool = await asyncpg.create_pool(own_db.postgres_dsn, min_size=1, max_size=4)
    assert pool is not None
    redis_client = create_redis(own_db)
    cache = StatusCache(redis_client, StatusKeys(own_db.redis_prefix))
    try:
        half = len(events) // 2
        await asyncio.gather(_live_traffic(pool, events[:half], 1), _live_traffic(pool, events[half:], 2))
        await cache.advance_many([cache_update(e) for e in events])
        live = await _snapshot(pool)
        live_cache = {rid: await cache.get(rid) for rid in streams}
        assert len(live["inference_requests"]) == len(streams)

        # Damage the read models and the cache: replay rebuilds them from the event store alone.
        some = next(iter(streams))
        await pool.execute("UPDATE inference_requests SET status = 'queued', prompt = NULL WHERE request_id = $1", some)
        await pool.execute("DELETE FROM token_usage")
        await pool.execute("UPDATE token_usage_daily SET total_tokens = 0")
        await redis_client.delete(StatusKeys(own_db.redis_prefix).status(some))

        out = io.StringIO()
        report = await replay(own_db, chunk=64, out=out)
        assert report.events == await pool.fetchval("SELECT count(*) FROM event_store")
        assert (report.requests, report.skipped) == (len(streams), 0)
        assert report.cached == len(streams)
        assert "replay events:" in out.getvalue()
        assert await _snapshot(pool) == live
        assert {rid: await cache.get(rid) for rid in streams} == live_cache

        # Again: the swapped-in tables carry the live names, so a second replay swaps cleanly too.
        await replay(own_db, chunk=1000, with_cache=False, out=io.StringIO())
        assert await _snapshot(pool) == live
    finally:
        await redis_client.aclose()
        await pool.close()


async def test_events_stored_while_replay_runs_are_not_lost(own_db: Settings) -> None:
    before = _streams(120, "early")
    during = _streams(120, "late")
    pool = await asyncpg.create_pool(own_db.postgres_dsn, min_size=1, max_size=4)
    assert pool is not None
    try:
        await _live_traffic(pool, [e for s in before.values() for e in s], 3)
        late_events = [e for s in during.values() for e in s]
        # The writer runs alongside the scan (small chunks) and against the swap's lock.
        await asyncio.gather(
            replay(own_db, chunk=20, with_cache=False, out=io.StringIO()), _live_traffic(pool, late_events, 4)
        )
        for rid, stream in {**before, **during}.items():
            (expected,) = plan_events(stream).requests
            row = await pool.fetchrow("SELECT * FROM inference_requests WHERE request_id = $1", rid)
            assert row is not None, rid
            assert {f: row[f] for f in UpsertRequest.__struct_fields__} == {
                f: getattr(expected, f) for f in UpsertRequest.__struct_fields__
            }
        completed = sum(1 for s in {**before, **during}.values() if s[-1].__class__.__name__ == "InferenceCompleted")
        assert await pool.fetchval("SELECT count(*) FROM token_usage") == completed
        assert await pool.fetchval("SELECT sum(requests) FROM token_usage_daily") == completed
    finally:
        await pool.close()


async def test_the_mlp_replay_command_prints_a_final_count(
    own_db: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    pool = await asyncpg.create_pool(own_db.postgres_dsn, min_size=1, max_size=2)
    assert pool is not None
    try:
        await apply_batch(pool, [e for s in _streams(10, "cli").values() for e in s])
    finally:
        await pool.close()
    for name, value in {
        "MLP_POSTGRES_DSN": own_db.postgres_dsn,
        "MLP_REDIS_URL": own_db.redis_url,
        "MLP_REDIS_PREFIX": own_db.redis_prefix,
        "MLP_ENVIRONMENT": "test",
    }.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    try:
        assert await asyncio.to_thread(main, []) == 0
    finally:
        get_settings.cache_clear()
    captured = capsys.readouterr()
    assert "into 10 request(s)" in captured.out
    assert "replay events:" in captured.err

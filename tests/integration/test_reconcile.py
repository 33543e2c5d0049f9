"""``mlp reconcile`` against the real Postgres and Redis: clean books give zero drift rows; a corrupted
read-model row and a corrupted Redis counter are reported exactly, and ``--repair`` rebuilds them from
the event store; daily aggregates, rows without events and broken streams are found too."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import redis.asyncio as redis

from mlp.cache import create_redis
from mlp.settings import Settings
from ops import reconcile
from ops.reconcile import Window, check
from projections.postgres import store_and_project
from projections.sample_events import request_stream
from quota.ledger import QuotaKeys, RedisLedger
from quota.plans import day_window
from quota.store import PostgresLedgerSource

pytestmark = pytest.mark.integration

# Far from today's requests: a window of its own for the broken streams.
PAST = Window(datetime(2024, 1, 1, tzinfo=UTC), datetime(2024, 1, 2, tzinfo=UTC))


def _window_args(window: Window) -> list[str]:
    return ["--from", window.start.isoformat(), "--to", window.end.isoformat(), "--settle", "0.2"]


@pytest.fixture(scope="module")
def now() -> datetime:
    """When the books are written: taken at the fixture, not at import (the suite may reach this module
    many minutes after collecting it, and the running request must still be young then)."""
    return datetime.now(UTC)


@pytest.fixture(scope="module")
def today(now: datetime) -> Window:
    return Window(now - timedelta(hours=1), now + timedelta(minutes=5))


@pytest.fixture(scope="module")
async def books(module_settings: Settings, now: datetime) -> AsyncIterator[Settings]:
    """Requests of every outcome, and one still running, stored and projected as the collector does;
    the quota counters built from that ledger as the services do after a Redis restart."""
    start = now - timedelta(minutes=2)
    streams = [
        request_stream("r-done-1", user_id="alice", start=start, tokens=(10, 5)),
        request_stream("r-done-2", user_id="alice", start=start, tokens=(20, 7)),
        request_stream("r-done-3", user_id="bob", start=start, tokens=(3, 4)),
        request_stream("r-failed", user_id="bob", outcome="failed", start=start),
        request_stream("r-rejected", user_id="bob", outcome="rejected", start=start),
        request_stream("r-running", user_id="carol", outcome="running", start=now - timedelta(seconds=5)),
        # broken streams, long ago: no outcome; an outcome without its request
        request_stream("r-lost", user_id="dave", outcome="queued", start=PAST.start + timedelta(hours=1)),
        request_stream("r-orphan", user_id="dave", start=PAST.start + timedelta(hours=2))[1:],
        # not broken: a poison message that named its request is rejected, its body never stored
        request_stream("r-poisoned", user_id="dave", outcome="rejected", start=PAST.start + timedelta(hours=3))[1:],
    ]
    pool = await asyncpg.create_pool(module_settings.postgres_dsn, min_size=1, max_size=2)
    assert pool is not None
    client = create_redis(module_settings, max_connections=4)
    try:
        for stream in streams:
            await store_and_project(pool, stream)
        ledger = RedisLedger(
            client,
            module_settings.redis_prefix,
            PostgresLedgerSource(pool),
            reservation_ttl_s=module_settings.reservation_ttl_s,
        )
        await ledger.ensure_built(datetime.now(UTC))
        yield module_settings
    finally:
        await client.aclose()
        await pool.close()


@pytest.fixture
async def conn(books: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(books.postgres_dsn)
    yield connection
    await connection.close()


@pytest.fixture
async def client(books: Settings) -> AsyncIterator[redis.Redis]:
    created = create_redis(books, max_connections=4)
    yield created
    await created.aclose()


async def run_cli(settings: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    """The command as `mlp reconcile ... --json` runs it (in this test's event loop)."""
    out = io.StringIO()
    code = await reconcile.run(reconcile.parse_args([*args, "--json"]), settings, out)
    report: dict[str, Any] = json.loads(out.getvalue())
    return code, report


async def test_clean_books_have_zero_drift(
    books: Settings, conn: asyncpg.Connection, client: redis.Redis, today: Window
) -> None:
    findings = await check(conn, client, books, today)
    assert findings.drift == []
    assert (findings.requests, findings.events) == (6, 3 + 3 + 3 + 3 + 2 + 2)
    # the open reservation is in Redis and in the ledger's view (running, not charged): they agree
    keys = QuotaKeys(books.redis_prefix)
    assert await client.hget(keys.amounts("carol"), "r-running") == "33"


def test_the_command_prints_zero_rows_and_exits_0_on_clean_books(books: Settings, today: Window) -> None:
    out = io.StringIO()
    assert reconcile.main(_window_args(today), out=out, settings=books) == 0
    assert "0 drift row(s)" in out.getvalue()


async def test_a_corrupted_row_and_counter_are_reported_exactly_and_repaired(
    books: Settings, conn: asyncpg.Connection, client: redis.Redis, today: Window
) -> None:
    await conn.execute(
        "UPDATE inference_requests SET status = 'failed', error_code = 'model_error' WHERE request_id = 'r-done-1'"
    )
    day = day_window(datetime.now(UTC)).id
    used = QuotaKeys(books.redis_prefix).used_day("alice", day)
    before = int(await client.get(used) or 0)
    assert before == 10 + 5 + 20 + 7
    await client.incrby(used, 5)

    code, report = await run_cli(books, *_window_args(today))
    assert code == 1
    assert report["drift"] == [
        {
            "check": "read_model",
            "key": "inference_requests/r-done-1",
            "expected": "status=completed, error_code=null",
            "actual": "status=failed, error_code=model_error",
        },
        {"check": "redis", "key": f"quota/used_day/alice/{day}", "expected": str(before), "actual": str(before + 5)},
    ]

    code, report = await run_cli(books, *_window_args(today), "--repair")
    assert code == 0
    assert len(report["drift"]) == 2
    assert report["repaired"] == {"requests": 1, "daily_rows": 1, "cache_entries": 1, "counters": True}
    assert report["after_repair"] == []
    assert await conn.fetchval("SELECT status FROM inference_requests WHERE request_id = 'r-done-1'") == "completed"
    assert int(await client.get(used) or 0) == before
    assert (await check(conn, client, books, today)).drift == []


async def test_a_daily_aggregate_and_a_row_without_events_are_found_and_repaired(
    books: Settings, conn: asyncpg.Connection, client: redis.Redis, today: Window
) -> None:
    day = datetime.now(UTC).date()
    await conn.execute(
        "UPDATE token_usage_daily SET total_tokens = total_tokens + 1 WHERE user_id = 'bob' AND day = $1", day
    )
    await conn.execute(
        "INSERT INTO inference_requests (request_id, user_id, model, status, updated_at)"
        " VALUES ('r-phantom', 'erin', 'basic-model', 'queued', now())"
    )
    findings = await check(conn, client, books, today)
    assert [(d.check, d.key) for d in findings.drift] == [
        ("ledger", f"token_usage_daily/bob/{day.isoformat()}/basic-model"),
        ("read_model", "inference_requests/r-phantom"),
    ]
    assert findings.drift[0].expected == "prompt=3 completion=4 total=7 requests=1"
    assert findings.drift[0].actual == "prompt=3 completion=4 total=8 requests=1"
    assert (findings.drift[1].expected, findings.drift[1].actual) == ("(no row)", "a row")

    code, report = await run_cli(books, *_window_args(today), "--repair")
    assert (code, report["after_repair"]) == (0, [])
    assert await conn.fetchval("SELECT count(*) FROM inference_requests WHERE request_id = 'r-phantom'") == 0


async def test_broken_streams_are_drift_that_repair_cannot_fix(
    books: Settings, conn: asyncpg.Connection, client: redis.Redis
) -> None:
    findings = await check(conn, client, books, PAST)
    assert [(d.key, d.expected, d.actual) for d in findings.drift] == [
        ("request/r-lost", "1 terminal event", "0 terminal events"),
        ("request/r-orphan", "1 InferenceRequested", "0 InferenceRequested"),
    ]
    # a request still within the grace may be on its way: not drift
    patient = await check(conn, client, books, PAST, grace_s=10 * 365 * 86_400)
    assert [d.key for d in patient.drift] == ["request/r-orphan"]

    code, report = await run_cli(books, *_window_args(PAST), "--repair")
    assert code == 1
    assert [d["key"] for d in report["after_repair"]] == ["request/r-lost", "request/r-orphan"]

"""The Postgres and Redis projections against the real services: idempotence, convergence, one outcome."""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest
import redis.asyncio as redis

from events.model import AnyEvent, InferenceFailed, InferenceRequested, encode_event, new_event_id
from events.status import STATUS_RANK
from mlp.cache import create_redis
from mlp.settings import Settings
from projections.postgres import apply_batch, is_permanent, store_and_project
from projections.projector import UpsertRequest, plan_events
from projections.queries import RequestView, get_request
from projections.sample_events import Outcome, request_stream
from projections.status_cache import StatusCache, StatusKeys, cache_update

pytestmark = pytest.mark.integration

OUTCOMES: tuple[Outcome, ...] = ("completed", "failed", "rejected", "running", "queued", "cancelled", "expired")


@pytest.fixture(scope="module")
async def redis_client(settings: Settings) -> AsyncIterator[redis.Redis]:
    client = create_redis(settings)
    yield client
    await client.aclose()


@pytest.fixture(scope="module")
def cache(redis_client: redis.Redis, settings: Settings) -> StatusCache:
    return StatusCache(redis_client, StatusKeys(settings.redis_prefix), ttl_s=600)


def _rid(label: str) -> str:
    return f"{label}-{uuid.uuid4().hex[:12]}"


_ROW_COLUMNS = tuple(f for f in UpsertRequest.__struct_fields__)


async def _row(pool: asyncpg.Pool, request_id: str) -> dict[str, object]:
    row = await pool.fetchrow("SELECT * FROM inference_requests WHERE request_id = $1", request_id)
    assert row is not None, request_id
    return {c: row[c] for c in _ROW_COLUMNS}


def _expected(events: Sequence[AnyEvent]) -> dict[str, object]:
    (write,) = plan_events(events).requests
    return msgspec.structs.asdict(write)


async def test_the_sql_status_rank_is_the_python_one(pool: asyncpg.Pool) -> None:
    for status, rank in STATUS_RANK.items():
        assert await pool.fetchval("SELECT mlp_status_rank($1)", status) == rank


async def test_a_batch_is_stored_once_and_a_redelivered_batch_changes_nothing(pool: asyncpg.Pool) -> None:
    labelled = [(_rid(o), o) for o in OUTCOMES for _ in range(3)]
    streams = {rid: request_stream(rid, outcome=o, attempts=2) for rid, o in labelled}
    events = [e for s in streams.values() for e in s]
    assert await apply_batch(pool, events) == len(events)
    assert await apply_batch(pool, events) == 0
    assert await apply_batch(pool, list(reversed(events))[:7]) == 0
    stored = await pool.fetch(
        "SELECT event_id, count(*) AS n FROM event_store WHERE request_id = ANY($1::text[]) GROUP BY event_id",
        list(streams),
    )
    assert len(stored) == len(events)
    assert {r["n"] for r in stored} == {1}
    for rid, stream in streams.items():
        assert await _row(pool, rid) == _expected(stream)


async def test_every_order_converges_even_one_event_per_transaction(pool: asyncpg.Pool) -> None:
    template = request_stream("t", outcome="completed", attempts=2)
    indices = list(range(len(template) + 1))  # + a duplicate of the first event
    for n, order in enumerate(itertools.permutations(indices)):
        rid = _rid(f"perm{n}")
        stream = request_stream(rid, outcome="completed", attempts=2, start=datetime(2025, 1, 1, tzinfo=UTC))
        with_dup = [*stream, stream[0]]
        if n % 2 == 0:
            for i in order:  # separate transactions, the worst case for ordering
                await apply_batch(pool, [with_dup[i]])
        else:
            await apply_batch(pool, [with_dup[i] for i in order])
        assert await _row(pool, rid) == _expected(stream), order


async def test_a_second_outcome_for_a_request_is_dropped_and_not_projected(pool: asyncpg.Pool) -> None:
    rid = _rid("twice")
    stream = request_stream(rid, outcome="completed")
    assert await apply_batch(pool, stream) == 3
    failed = request_stream(rid, outcome="failed")[-1]
    assert isinstance(failed, InferenceFailed)
    assert await apply_batch(pool, [failed]) == 0
    row = await _row(pool, rid)
    assert (row["status"], row["error_code"]) == ("completed", None)
    types = await pool.fetch("SELECT type FROM event_store WHERE request_id = $1", rid)
    assert sorted(t["type"] for t in types) == ["InferenceCompleted", "InferenceRequested", "InferenceStarted"]
    assert await pool.fetchval("SELECT count(*) FROM token_usage WHERE request_id = $1", rid) == 1


async def test_a_cancel_or_expiry_after_another_outcome_is_dropped_and_the_reverse_too(pool: asyncpg.Pool) -> None:
    done = _rid("done-then-cancel")
    assert await apply_batch(pool, request_stream(done, outcome="completed")) == 3
    for late in ("cancelled", "expired"):
        assert await apply_batch(pool, [request_stream(done, outcome=late)[-1]]) == 0
    assert (await _row(pool, done))["status"] == "completed"
    cancelled = _rid("cancel-then-done")
    assert await apply_batch(pool, request_stream(cancelled, outcome="cancelled")) == 3
    assert await apply_batch(pool, [request_stream(cancelled, outcome="completed")[-1]]) == 0
    row = await _row(pool, cancelled)
    assert (row["status"], row["error_code"]) == ("cancelled", "cancelled")
    assert await pool.fetchval("SELECT count(*) FROM token_usage WHERE request_id = $1", cancelled) == 0


async def test_the_event_store_keeps_the_body_verbatim_with_fields_of_a_newer_schema(pool: asyncpg.Pool) -> None:
    event = request_stream(_rid("newer"))[0]
    body = msgspec.json.encode({**msgspec.json.decode(encode_event(event)), "priority": "high", "schema_version": 2})
    new = await store_and_project(pool, [event], [body])
    assert new == [event]
    payload = await pool.fetchval(
        "SELECT payload::text FROM event_store WHERE event_id = $1", uuid.UUID(event.event_id)
    )
    assert msgspec.json.decode(payload)["priority"] == "high"


async def test_a_value_postgres_refuses_is_a_permanent_error_and_rolls_back(pool: asyncpg.Pool) -> None:
    rid = _rid("nul")
    good = request_stream(rid)[0]
    assert isinstance(good, InferenceRequested)
    bad = msgspec.structs.replace(good, event_id=new_event_id(), prompt="a\x00b")
    with pytest.raises(asyncpg.PostgresError) as caught:
        await apply_batch(pool, [good, bad])
    assert is_permanent(caught.value)
    assert await pool.fetchval("SELECT count(*) FROM event_store WHERE request_id = $1", rid) == 0


async def test_usage_is_charged_once_into_the_ledger_and_the_utc_daily_aggregate(pool: asyncpg.Pool) -> None:
    user = _rid("spender")
    midnight = datetime(2025, 6, 30, 23, 59, 59, 900000, tzinfo=UTC)
    day1 = [
        request_stream(_rid("d1"), user_id=user, start=midnight - timedelta(hours=1), tokens=(10, 5)) for _ in range(2)
    ]
    day2 = [request_stream(_rid("d2"), user_id=user, start=midnight, tokens=(1, 2))]  # completes after midnight
    events = [e for s in day1 + day2 for e in s]
    await asyncio.gather(apply_batch(pool, events[::2]), apply_batch(pool, events[1::2]))
    await apply_batch(pool, events)
    rows = await pool.fetch(
        "SELECT day, model, prompt_tokens, completion_tokens, total_tokens, requests FROM token_usage_daily"
        " WHERE user_id = $1 ORDER BY day",
        user,
    )
    assert [tuple(r) for r in rows] == [
        (midnight.date(), "basic-model", 20, 10, 30, 2),
        ((midnight + timedelta(days=1)).date(), "basic-model", 1, 2, 3, 1),
    ]
    assert await pool.fetchval("SELECT sum(total_tokens) FROM token_usage WHERE user_id = $1", user) == 33


async def test_concurrent_overlapping_batches_store_each_event_once(pool: asyncpg.Pool) -> None:
    streams = {rid: request_stream(rid, outcome="completed") for rid in (_rid("cc") for _ in range(40))}
    events = [e for s in streams.values() for e in s]
    counts = await asyncio.gather(*(apply_batch(pool, events[i:] + events[:i]) for i in range(0, 120, 30)))
    assert sum(counts) == len(events)
    for rid, stream in streams.items():
        assert await _row(pool, rid) == _expected(stream)


async def _advance_all(cache: StatusCache, events: Sequence[AnyEvent]) -> None:
    for event in events:
        await cache.advance(*cache_update(event))


async def test_the_status_cache_converges_whatever_the_order_and_never_leaves_a_terminal(cache: StatusCache) -> None:
    template = request_stream("t", outcome="completed", attempts=2)
    states = []
    for n, order in enumerate(itertools.permutations(range(len(template)))):
        rid = _rid(f"c{n}")
        stream = request_stream(rid, outcome="completed", attempts=2, start=datetime(2025, 1, 1, tzinfo=UTC))
        await _advance_all(cache, [stream[i] for i in order])
        got = await cache.get(rid)
        assert got is not None
        got.pop("trace_id")
        states.append({k: v.replace(rid, "R") for k, v in got.items()})
    assert all(s == states[0] for s in states)
    assert states[0]["status"] == "completed"


async def test_advance_reports_changes_and_is_idempotent(
    cache: StatusCache, redis_client: redis.Redis, settings: Settings
) -> None:
    rid = _rid("idem")
    requested, started, completed = request_stream(rid)
    assert await cache.advance(*cache_update(requested)) is True
    assert await cache.advance(*cache_update(requested)) is False
    assert await cache.advance(*cache_update(completed)) is True
    assert await cache.advance(*cache_update(started)) is True  # fills in started_at, status stays
    assert await cache.advance(*cache_update(started)) is False
    got = await cache.get(rid)
    assert got is not None
    assert got["status"] == "completed"
    failed = request_stream(rid, outcome="failed")[-1]
    await cache.advance(*cache_update(failed))  # (the collector never sends a second outcome: the store drops it)
    after = await cache.get(rid) or {}
    assert after["status"] == "completed"
    assert "error_code" not in after
    assert after["finished_at"] == got["finished_at"]
    assert 0 < await redis_client.ttl(StatusKeys(settings.redis_prefix).status(rid)) <= 600
    assert await cache.get(_rid("missing")) is None


async def test_cache_and_postgres_give_the_same_view(pool: asyncpg.Pool, cache: StatusCache) -> None:
    for outcome in OUTCOMES:
        rid = _rid(f"view-{outcome}")
        stream = request_stream(rid, outcome=outcome, attempts=2)
        shuffled = stream[::-1]
        await apply_batch(pool, shuffled)
        await cache.advance_many([cache_update(e) for e in shuffled])
        from_pg = await get_request(pool, rid)
        cached = await cache.get(rid)
        assert from_pg is not None
        assert cached is not None
        assert RequestView.from_cache(rid, cached) == from_pg
        assert from_pg.status == outcome
    assert await get_request(pool, _rid("missing")) is None


async def test_restore_replaces_an_entry_unless_it_moved_further(cache: StatusCache) -> None:
    rid = _rid("restore")
    requested, _, completed = request_stream(rid)
    await cache.advance(*cache_update(requested))
    rebuilt = {"status": "running", "user_id": "alice", "model": "basic-model", "updated_at": "2025-01-01T00:00:00Z"}
    assert await cache.restore_many([(rid, rebuilt)]) == 1
    got = await cache.get(rid)
    assert got is not None
    assert got["status"] == "running"
    assert "created_at" not in got  # replaced, not merged
    await cache.advance(*cache_update(completed))
    assert await cache.restore_many([(rid, rebuilt)]) == 0
    assert (await cache.get(rid) or {})["status"] == "completed"


async def test_a_second_request_under_a_stored_id_is_never_stored(pool: asyncpg.Pool) -> None:
    # One request per stream (migration 0007): another tenant's (or another prompt's) request under the id.
    rid = _rid("taken")
    first = request_stream(rid, user_id="alice")[0]
    intruder = request_stream(rid, user_id="bob")[0]
    assert isinstance(first, InferenceRequested)
    assert isinstance(intruder, InferenceRequested)
    assert await store_and_project(pool, [first]) == [first]
    assert await store_and_project(pool, [intruder]) == []
    assert await store_and_project(pool, [first]) == []  # a redelivery was a duplicate already
    rows = await pool.fetch("SELECT payload->>'user_id' AS user_id FROM event_store WHERE request_id = $1", rid)
    assert [r["user_id"] for r in rows] == ["alice"]
    row = await pool.fetchrow("SELECT user_id, prompt FROM inference_requests WHERE request_id = $1", rid)
    assert row is not None
    assert (row["user_id"], row["prompt"]) == ("alice", first.prompt)

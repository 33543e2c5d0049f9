"""Postgres adapter of the projections: store a batch of events and project the new ones, in ONE transaction.

The event store is the projection inbox. ``INSERT ... ON CONFLICT DO NOTHING RETURNING event_id``
tells which events of the batch are new (not seen before by event_id, not a second outcome of a
request and not a second request under its id: see the unique indexes ``event_store_one_outcome`` and
``event_store_one_request``); only those are projected, in the same
transaction. A redelivered batch therefore stores and projects nothing twice, and there is no
checkpoint to keep.

Writes are applied set-wise, rows passed as arrays and expanded with ``unnest``: per batch, one
statement stores the events and one more applies every read-model write (one round trip each, whatever
the batch size). The status-rank rule is in the SQL itself, so collectors running concurrently cannot
move a status backwards.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from events.model import Event, encode_event
from projections.projector import BatchPlan, plan_events


@dataclass(frozen=True)
class Tables:
    """Names of the read-model tables a plan is applied to (live, or the ``*_rebuild`` copies of replay)."""

    requests: str = "inference_requests"
    results: str = "inference_results"
    usage: str = "token_usage"
    daily: str = "token_usage_daily"

    def suffixed(self, suffix: str) -> Tables:
        return Tables(*(name + suffix for name in self.all()))

    def all(self) -> tuple[str, str, str, str]:
        return (self.requests, self.results, self.usage, self.daily)


LIVE = Tables()
_json = msgspec.json.Encoder()

# A connection of its own or one borrowed from a pool.
Connection = asyncpg.Connection | PoolConnectionProxy

_STORE_EVENTS = """
INSERT INTO event_store (event_id, request_id, type, occurred_at, payload)
SELECT e.event_id, e.request_id, e.type, e.occurred_at, e.payload::jsonb
FROM unnest($1::uuid[], $2::text[], $3::text[], $4::timestamptz[], $5::text[])
    AS e(event_id, request_id, type, occurred_at, payload)
ON CONFLICT DO NOTHING
RETURNING event_id
"""

# True when the incoming row moves the status forward (a terminal status has the top rank).
_MOVES = "mlp_status_rank(EXCLUDED.status) > mlp_status_rank(r.status)"

# The three kinds of read-model write as data-modifying CTEs of ONE statement: one round trip per batch
# instead of three. Postgres runs every such CTE exactly once and to completion, whether or not the main
# query reads it, and each targets its own table, so none can see or conflict with another's rows.
_APPLY_PLAN = f"""
WITH requests AS (
    INSERT INTO {{requests}} AS r (
        request_id, user_id, model, status, updated_at, prompt, max_tokens, source, trace_id,
        reserved_tokens, error_code, error_message, reject_reason, created_at, started_at, finished_at)
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::timestamptz[], $6::text[], $7::int[], $8::text[],
        $9::text[], $10::int[], $11::text[], $12::text[], $13::text[], $14::timestamptz[], $15::timestamptz[],
        $16::timestamptz[])
    ON CONFLICT (request_id) DO UPDATE SET
        status = CASE WHEN {_MOVES} THEN EXCLUDED.status ELSE r.status END,
        updated_at = GREATEST(r.updated_at, EXCLUDED.updated_at),
        prompt = COALESCE(r.prompt, EXCLUDED.prompt),
        max_tokens = COALESCE(r.max_tokens, EXCLUDED.max_tokens),
        source = COALESCE(r.source, EXCLUDED.source),
        trace_id = COALESCE(r.trace_id, EXCLUDED.trace_id),
        reserved_tokens = GREATEST(r.reserved_tokens, EXCLUDED.reserved_tokens),
        error_code = CASE WHEN {_MOVES} THEN EXCLUDED.error_code ELSE r.error_code END,
        error_message = CASE WHEN {_MOVES} THEN EXCLUDED.error_message ELSE r.error_message END,
        reject_reason = CASE WHEN {_MOVES} THEN EXCLUDED.reject_reason ELSE r.reject_reason END,
        finished_at = CASE WHEN {_MOVES} THEN EXCLUDED.finished_at ELSE r.finished_at END,
        created_at = LEAST(r.created_at, EXCLUDED.created_at),
        started_at = LEAST(r.started_at, EXCLUDED.started_at)
),
-- Embeddings travel as JSON text (unnest would flatten an array of arrays) and are stored as jsonb.
results AS (
    INSERT INTO {{results}} (
        request_id, completion, prompt_tokens, completion_tokens, total_tokens, latency_ms, completed_at, embedding)
    SELECT x.request_id, x.completion, x.prompt_tokens, x.completion_tokens, x.total_tokens, x.latency_ms,
           x.completed_at, x.embedding::jsonb
    FROM unnest($17::text[], $18::text[], $19::int[], $20::int[], $21::int[], $22::float8[], $23::timestamptz[],
                $24::text[])
        AS x(request_id, completion, prompt_tokens, completion_tokens, total_tokens, latency_ms, completed_at,
             embedding)
    ON CONFLICT (request_id) DO NOTHING
),
-- The ledger row is the charge; the daily aggregate grows only by the rows this statement inserted.
charged AS (
    INSERT INTO {{usage}} (request_id, user_id, model, prompt_tokens, completion_tokens, total_tokens, occurred_at)
    SELECT * FROM unnest($25::text[], $26::text[], $27::text[], $28::int[], $29::int[], $30::int[],
                         $31::timestamptz[])
    ON CONFLICT (request_id) DO NOTHING
    RETURNING user_id, model, prompt_tokens, completion_tokens, total_tokens, occurred_at
)
INSERT INTO {{daily}} AS d (user_id, day, model, prompt_tokens, completion_tokens, total_tokens, requests)
SELECT user_id, (occurred_at AT TIME ZONE 'UTC')::date, model,
       sum(prompt_tokens), sum(completion_tokens), sum(total_tokens), count(*)
FROM charged
GROUP BY 1, 2, 3
ORDER BY 1, 2, 3
ON CONFLICT (user_id, day, model) DO UPDATE SET
    prompt_tokens = d.prompt_tokens + EXCLUDED.prompt_tokens,
    completion_tokens = d.completion_tokens + EXCLUDED.completion_tokens,
    total_tokens = d.total_tokens + EXCLUDED.total_tokens,
    requests = d.requests + EXCLUDED.requests
"""


def _unique_by_event_id(events: Sequence[Event], payloads: Sequence[bytes]) -> list[tuple[uuid.UUID, Event, bytes]]:
    """The first of each event id, with the id parsed once (parsing was 2.8% of the collector's samples)."""
    seen: set[uuid.UUID] = set()
    unique: list[tuple[uuid.UUID, Event, bytes]] = []
    for event, payload in zip(events, payloads, strict=True):
        key = uuid.UUID(event.event_id)
        if key not in seen:
            seen.add(key)
            unique.append((key, event, payload))
    return unique


async def store_events(
    conn: Connection, events: Sequence[Event], payloads: Sequence[bytes] | None = None
) -> list[Event]:
    """Append the events to the store; returns those newly stored (in input order). Call inside a transaction."""
    if payloads is None:
        payloads = [encode_event(e) for e in events]
    unique = _unique_by_event_id(events, payloads)
    if not unique:
        return []
    # Insert in event_id order: concurrent collectors holding overlapping batches (a redelivery)
    # then wait on each other in one direction instead of deadlocking.
    ordered = sorted(unique, key=lambda row: row[0])
    rows = await conn.fetch(
        _STORE_EVENTS,
        [key for key, _, _ in ordered],
        [e.request_id for _, e, _ in ordered],
        [type(e).__name__ for _, e, _ in ordered],
        [e.occurred_at for _, e, _ in ordered],
        [p.decode() for _, _, p in ordered],
    )
    stored = {uuid.UUID(bytes=r["event_id"].bytes) for r in rows}
    return [e for key, e, _ in unique if key in stored]


@functools.cache
def _apply_plan_sql(tables: Tables) -> str:
    """``_APPLY_PLAN`` for these tables, formatted once per set of tables rather than once per batch."""
    return _APPLY_PLAN.format(requests=tables.requests, results=tables.results, usage=tables.usage, daily=tables.daily)


async def apply_plan(conn: Connection, batch: BatchPlan, tables: Tables = LIVE) -> None:
    """Apply a plan's writes in one statement (``_APPLY_PLAN``; a kind with no rows gets empty arrays).
    Call inside a transaction."""
    if not (batch.requests or batch.results or batch.usage):
        return
    rows, res, use = batch.requests, batch.results, batch.usage
    await conn.execute(
        _apply_plan_sql(tables),
        [w.request_id for w in rows],
        [w.user_id for w in rows],
        [w.model for w in rows],
        [w.status for w in rows],
        [w.updated_at for w in rows],
        [w.prompt for w in rows],
        [w.max_tokens for w in rows],
        [w.source for w in rows],
        [w.trace_id for w in rows],
        [w.reserved_tokens for w in rows],
        [w.error_code for w in rows],
        [w.error_message for w in rows],
        [w.reject_reason for w in rows],
        [w.created_at for w in rows],
        [w.started_at for w in rows],
        [w.finished_at for w in rows],
        [w.request_id for w in res],
        [w.completion for w in res],
        [w.prompt_tokens for w in res],
        [w.completion_tokens for w in res],
        [w.total_tokens for w in res],
        [w.latency_ms for w in res],
        [w.completed_at for w in res],
        [None if w.embedding is None else _json.encode(w.embedding).decode() for w in res],
        [w.request_id for w in use],
        [w.user_id for w in use],
        [w.model for w in use],
        [w.prompt_tokens for w in use],
        [w.completion_tokens for w in use],
        [w.total_tokens for w in use],
        [w.occurred_at for w in use],
    )


async def store_and_project(
    db: asyncpg.Pool | Connection, events: Sequence[Event], payloads: Sequence[bytes] | None = None
) -> list[Event]:
    """Store the batch and project the newly stored events, in ONE transaction. Returns the new events.

    ``payloads`` are the events' bodies as received: stored verbatim, so fields added by a newer
    schema than this reader knows survive in the store (and in a later replay).
    """
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await store_and_project(conn, events, payloads)
    async with db.transaction():
        new = await store_events(db, events, payloads)
        if new:
            await apply_plan(db, plan_events(new))
    return new


async def apply_batch(
    db: asyncpg.Pool | Connection, events: Sequence[Event], payloads: Sequence[bytes] | None = None
) -> int:
    """Store and project a batch in one transaction; returns how many events were newly stored."""
    return len(await store_and_project(db, events, payloads))


# Errors that no retry will cure: the data itself is refused (e.g. a NUL character, a value out of
# range). Everything else (connection lost, server restarting, deadlock, a plan invalidated by a
# replay's table swap) is worth retrying.
PERMANENT_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    asyncpg.ProgramLimitExceededError,
)


def is_permanent(exc: BaseException) -> bool:
    return isinstance(exc, PERMANENT_ERRORS)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: the database (or the way to it) failed, not the data."""
    if is_permanent(exc):
        return False
    return isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError | OSError | TimeoutError)

"""The Postgres adapter of webhooks (migration 0009): endpoints, signing secrets, one-off targets and the
delivery log that is also the dispatcher's work queue. Every function takes the pool; nothing here logs a
secret.
"""

from __future__ import annotations

import secrets as _random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from events.model import TERMINAL_EVENTS, Event, EventDecodeError, decode_event, encode_event
from webhooks.rules import DeliveryState, Outcome
from webhooks.signing import new_secret

WEBHOOK_ID_PATTERN: Final = r"^wh_[0-9a-f]{24}$"
# NOTIFY'd with the user id, in the transaction that creates or deletes one of the user's webhooks: the
# dispatcher binds or unbinds that user's outcome keys (webhook_dispatcher.bindings).
CHANGED_CHANNEL: Final = "mlp_webhooks_changed"
# The terminal types as an SQL literal list (class names: safe to inline). Inlined, not a parameter, so the
# planner proves the partial index event_store_outcomes_by_user (migration 0012) applies, in every plan.
_TERMINAL_TYPES_SQL: Final = ", ".join(f"'{t.__name__}'" for t in TERMINAL_EVENTS)


class WebhookLimitReached(Exception):
    """The user already has the most webhooks allowed (``MLP_WEBHOOK_MAX_PER_USER``)."""


@dataclass(frozen=True, slots=True)
class Webhook:
    webhook_id: str
    user_id: str
    url: str
    events: tuple[str, ...]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Delivery:
    """One row of the delivery log."""

    delivery_id: int
    webhook_id: str | None  # None: a request's one-off webhook_url
    user_id: str
    url: str
    event_id: str
    event_type: str
    request_id: str
    state: DeliveryState
    attempts: int
    next_attempt_at: datetime | None  # when pending
    last_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


@dataclass(frozen=True, slots=True)
class DueDelivery:
    """A claimed delivery: what one attempt sends, and what it needs to be recorded."""

    delivery_id: int
    attempts: int  # including this one
    url: str
    event_id: str
    body: bytes
    secret: str | None  # None: the endpoint's secret is gone (never expected: deleting cascades)
    retry_from: datetime


def _webhook(row: asyncpg.Record) -> Webhook:
    return Webhook(row["webhook_id"], row["user_id"], row["url"], tuple(row["events"]), row["created_at"])


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(
        delivery_id=row["delivery_id"],
        webhook_id=row["webhook_id"],
        user_id=row["user_id"],
        url=row["url"],
        event_id=row["event_id"],
        event_type=row["event_type"],
        request_id=row["request_id"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"] if row["state"] == "pending" else None,
        last_attempt_at=row["last_attempt_at"],
        last_status_code=row["last_status_code"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        delivered_at=row["delivered_at"],
    )


_WEBHOOK_COLUMNS = "webhook_id, user_id, url, events, created_at"
_DELIVERY_COLUMNS = (
    "delivery_id, webhook_id, user_id, url, event_id, event_type, request_id, state, attempts, next_attempt_at,"
    " last_attempt_at, last_status_code, last_error, created_at, delivered_at"
)


# --- the gateway's side: endpoints and one-off targets -----------------------------------------


async def create_webhook(
    pool: asyncpg.Pool, user_id: str, url: str, events: Sequence[str], *, max_per_user: int
) -> tuple[Webhook, str]:
    """Register an endpoint; returns it and its new secret (the only time the secret leaves the store)."""
    webhook_id = "wh_" + _random.token_hex(12)
    secret = new_secret()
    async with pool.acquire() as conn, conn.transaction():
        # One user's registrations in turn, so two concurrent ones cannot both pass the cap.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('mlp.webhooks:' || $1, 0))", user_id)
        count = await conn.fetchval("SELECT count(*) FROM webhooks WHERE user_id = $1", user_id)
        if count >= max_per_user:
            raise WebhookLimitReached(f"user {user_id!r} already has {count} webhooks; the limit is {max_per_user}")
        row = await conn.fetchrow(
            f"INSERT INTO webhooks (webhook_id, user_id, url, events, secret) VALUES ($1, $2, $3, $4, $5)"
            f" RETURNING {_WEBHOOK_COLUMNS}",
            webhook_id,
            user_id,
            url,
            list(events),
            secret,
        )
        await conn.execute("SELECT pg_notify($1, $2)", CHANGED_CHANNEL, user_id)
    assert row is not None
    return _webhook(row), secret


async def list_webhooks(pool: asyncpg.Pool, user_id: str | None) -> list[Webhook]:
    """A user's endpoints (None: everyone's), oldest first."""
    rows = await pool.fetch(
        f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE $1::text IS NULL OR user_id = $1"
        " ORDER BY created_at, webhook_id LIMIT 1000",
        user_id,
    )
    return [_webhook(r) for r in rows]


async def get_webhook(pool: asyncpg.Pool, webhook_id: str) -> Webhook | None:
    row = await pool.fetchrow(f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE webhook_id = $1", webhook_id)
    return None if row is None else _webhook(row)


async def delete_webhook(pool: asyncpg.Pool, webhook_id: str) -> bool:
    """Remove an endpoint with its delivery log (pending deliveries stop); False when there was none."""
    async with pool.acquire() as conn, conn.transaction():
        user_id = await conn.fetchval("DELETE FROM webhooks WHERE webhook_id = $1 RETURNING user_id", webhook_id)
        if user_id is None:
            return False
        await conn.execute("SELECT pg_notify($1, $2)", CHANGED_CHANNEL, user_id)
    return True


async def webhook_deliveries(
    pool: asyncpg.Pool, webhook_id: str, *, state: DeliveryState | None = None, limit: int = 100
) -> list[Delivery]:
    """An endpoint's delivery log, newest first."""
    rows = await pool.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = $1"
        " AND ($2::text IS NULL OR state = $2) ORDER BY delivery_id DESC LIMIT $3",
        webhook_id,
        state,
        limit,
    )
    return [_delivery(r) for r in rows]


async def user_signing_secret(conn: asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy, user_id: str) -> str:
    """The user's signing secret of one-off ``webhook_url`` deliveries, created on first use."""
    await conn.execute(
        "INSERT INTO webhook_user_secrets (user_id, secret) VALUES ($1, $2) ON CONFLICT (user_id) DO NOTHING",
        user_id,
        new_secret(),
    )
    secret: str = await conn.fetchval("SELECT secret FROM webhook_user_secrets WHERE user_id = $1", user_id)
    return secret


async def remember_target(pool: asyncpg.Pool, request_id: str, user_id: str, url: str) -> None:
    """A request's one-off target, with the user's signing secret, before the request is published."""
    async with pool.acquire() as conn, conn.transaction():
        await user_signing_secret(conn, user_id)
        await conn.execute(
            "INSERT INTO webhook_request_targets (request_id, user_id, url) VALUES ($1, $2, $3)"
            " ON CONFLICT (request_id) DO NOTHING",
            request_id,
            user_id,
            url,
        )


class PostgresTargets:
    """``remember_target`` bound to a pool: what the gateway's submit records a one-off target with."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def remember(self, request_id: str, user_id: str, url: str) -> None:
        await remember_target(self._pool, request_id, user_id, url)

    async def forget(self, request_id: str) -> None:
        """A request that was not accepted after all (its publish failed): no webhook for it."""
        await self._pool.execute("DELETE FROM webhook_request_targets WHERE request_id = $1", request_id)


# --- the dispatcher's side: enqueue, claim, record ----------------------------------------------

_ENQUEUE_SUBSCRIBED = """
INSERT INTO webhook_deliveries (webhook_id, user_id, url, event_id, event_type, request_id, body)
SELECT webhook_id, user_id, url, $1, $2, $3, $4 FROM webhooks WHERE user_id = $5 AND $2 = ANY (events)
ON CONFLICT DO NOTHING
"""


async def enqueue(pool: asyncpg.Pool, event: Event) -> int:
    """One delivery per registered endpoint of the user that wants ``event``, in one statement; a redelivered
    event adds nothing. Returns the rows added. (A request's one-off target: ``enqueue_one_off_targets``.)"""
    body = encode_event(event).decode()
    args = (event.event_id, type(event).__name__, event.request_id, body, event.user_id)
    return _count(await pool.execute(_ENQUEUE_SUBSCRIBED, *args))


# The pending one-off targets (the table holds only those: a target is deleted with its delivery's enqueue)
# whose request has an outcome in the event store. Empty table, nothing read.
_DUE_TARGETS = f"""
SELECT t.request_id, t.user_id, t.url, e.payload::text AS payload
FROM webhook_request_targets AS t
JOIN LATERAL (
    SELECT payload FROM event_store AS s
    WHERE s.request_id = t.request_id AND s.type IN ({_TERMINAL_TYPES_SQL})
    ORDER BY s.occurred_at, s.event_id LIMIT 1
) AS e ON true
ORDER BY t.created_at LIMIT $1
"""
_ENQUEUE_ONE_OFF = """
INSERT INTO webhook_deliveries (webhook_id, user_id, url, event_id, event_type, request_id, body)
VALUES (NULL, $1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING
"""


async def enqueue_one_off_targets(pool: asyncpg.Pool, limit: int = 500) -> int:
    """Enqueue the delivery of each one-off ``webhook_url`` target whose request has an outcome in the event
    store, and remove the target in the same transaction; returns the deliveries added. An outcome that does
    not decode (never expected: the collector stored it decoded) leaves its target, logged by the caller's
    count staying 0. A request's first outcome is delivered, as the event store keeps only one."""
    async with pool.acquire() as conn, conn.transaction():
        rows = await conn.fetch(_DUE_TARGETS, limit)
        added = 0
        done: list[str] = []
        for row in rows:
            try:
                event = decode_event(row["payload"])
            except EventDecodeError:
                continue
            added += _count(
                await conn.execute(
                    _ENQUEUE_ONE_OFF,
                    row["user_id"],
                    row["url"],
                    event.event_id,
                    type(event).__name__,
                    event.request_id,
                    encode_event(event).decode(),
                )
            )
            done.append(row["request_id"])
        if done:
            await conn.execute("DELETE FROM webhook_request_targets WHERE request_id = ANY ($1::text[])", done)
    return added


# --- the dispatcher's side: which users' outcome keys are bound ---------------------------------------


async def webhook_users(pool: asyncpg.Pool, user_id: str | None = None) -> set[str]:
    """The users with at least one webhook (only ``user_id``, if given)."""
    rows = await pool.fetch("SELECT DISTINCT user_id FROM webhooks WHERE $1::text IS NULL OR user_id = $1", user_id)
    return {r["user_id"] for r in rows}


async def bound_users(pool: asyncpg.Pool, user_id: str | None = None) -> set[str]:
    """The users whose outcome keys the dispatcher has bound (``webhook_bindings``)."""
    rows = await pool.fetch("SELECT user_id FROM webhook_bindings WHERE $1::text IS NULL OR user_id = $1", user_id)
    return {r["user_id"] for r in rows}


async def record_bound(pool: asyncpg.Pool, user_id: str) -> None:
    """After the bind: the binding's bound_at ends the window that ``catch_up`` reads (kept when already there)."""
    await pool.execute("INSERT INTO webhook_bindings (user_id) VALUES ($1) ON CONFLICT DO NOTHING", user_id)


async def record_unbound(pool: asyncpg.Pool, user_id: str) -> None:
    await pool.execute("DELETE FROM webhook_bindings WHERE user_id = $1", user_id)


# The outcomes no queue saw: a bound user's, that occurred from a webhook's creation to the binding (with a
# margin for the clocks of the workers that set occurred_at), without a delivery to that webhook yet.
# Bindings older than the horizon are not read again (their window was read every resync since).
_CATCH_UP = f"""
SELECT w.webhook_id, w.user_id, w.url, e.payload::text AS payload
FROM webhook_bindings AS b
JOIN webhooks AS w ON w.user_id = b.user_id AND w.created_at <= b.bound_at + make_interval(secs => $2)
JOIN event_store AS e
    ON (e.payload ->> 'user_id') = b.user_id
    AND e.type IN ({_TERMINAL_TYPES_SQL}) AND e.type = ANY (w.events)
    AND e.occurred_at >= w.created_at - make_interval(secs => $2)
    AND e.occurred_at <= b.bound_at + make_interval(secs => $2)
WHERE ($1::text IS NULL OR b.user_id = $1) AND b.bound_at >= now() - make_interval(secs => $3)
    AND NOT EXISTS (
        SELECT 1 FROM webhook_deliveries AS d WHERE d.webhook_id = w.webhook_id AND d.request_id = e.request_id
    )
LIMIT $4
"""
_ENQUEUE_ONE = """
INSERT INTO webhook_deliveries (webhook_id, user_id, url, event_id, event_type, request_id, body)
VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT DO NOTHING
"""
CLOCK_MARGIN_S: Final = 5.0
CATCH_UP_HORIZON_S: Final = 3600.0


async def catch_up(pool: asyncpg.Pool, user_id: str | None = None, *, limit: int = 1000) -> int:
    """Enqueue, from the event store, the outcomes of bound users (only ``user_id``, if given) that went past
    ``mlp.webhooks`` because they were published before the binding; returns the deliveries added. Run
    after each bind and on every resync (the collector may store such an outcome later than the bind)."""
    added = 0
    while True:
        rows = await pool.fetch(_CATCH_UP, user_id, CLOCK_MARGIN_S, CATCH_UP_HORIZON_S, limit)
        inserted = 0
        async with pool.acquire() as conn, conn.transaction():
            for row in rows:
                try:
                    event = decode_event(row["payload"])
                except EventDecodeError:
                    continue
                inserted += _count(
                    await conn.execute(
                        _ENQUEUE_ONE,
                        row["webhook_id"],
                        row["user_id"],
                        row["url"],
                        event.event_id,
                        type(event).__name__,
                        event.request_id,
                        encode_event(event).decode(),
                    )
                )
        added += inserted
        if len(rows) < limit or not inserted:
            return added


def _count(status: str) -> int:
    return int(status.rsplit(" ", 1)[-1])  # "INSERT 0 <n>"


_CLAIM = """
WITH due AS (
    SELECT delivery_id FROM webhook_deliveries
    WHERE state = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries AS d
SET attempts = d.attempts + 1, last_attempt_at = now(), next_attempt_at = now() + make_interval(secs => $2)
FROM due WHERE d.delivery_id = due.delivery_id
RETURNING d.delivery_id, d.attempts, d.url, d.event_id, d.body, d.retry_from,
    COALESCE(
        (SELECT w.secret FROM webhooks AS w WHERE w.webhook_id = d.webhook_id),
        (SELECT s.secret FROM webhook_user_secrets AS s WHERE d.webhook_id IS NULL AND s.user_id = d.user_id)
    ) AS secret
"""


async def claim_due(pool: asyncpg.Pool, limit: int, lease_s: float) -> list[DueDelivery]:
    """Claim up to ``limit`` due deliveries for one attempt each: the attempt is counted and the row's next
    attempt moved ``lease_s`` ahead, so a dispatcher that dies mid-attempt leaves it pending, due again
    after the lease (retried by any replica, with the same webhook-id). Rows other replicas are claiming
    are skipped, not waited for."""
    rows = await pool.fetch(_CLAIM, limit, lease_s)
    return [
        DueDelivery(
            delivery_id=r["delivery_id"],
            attempts=r["attempts"],
            url=r["url"],
            event_id=r["event_id"],
            body=r["body"].encode(),
            secret=r["secret"],
            retry_from=r["retry_from"],
        )
        for r in rows
    ]


async def record_attempt(
    pool: asyncpg.Pool, due: DueDelivery, outcome: Outcome, *, status_code: int | None, error: str | None
) -> bool:
    """Record an attempt's outcome; False when the claim was lost meanwhile (another replica's attempt after
    the lease ran out, or a replay): that attempt's record wins."""
    done = await pool.fetchval(
        "UPDATE webhook_deliveries SET state = $3, next_attempt_at = COALESCE($4, next_attempt_at),"
        " last_status_code = $5, last_error = $6,"
        " delivered_at = CASE WHEN $3 = 'delivered' THEN now() ELSE delivered_at END"
        " WHERE delivery_id = $1 AND attempts = $2 AND state = 'pending' RETURNING true",
        due.delivery_id,
        due.attempts,
        outcome.state,
        outcome.next_attempt_at,
        status_code,
        error,
    )
    return done is not None


async def pending_count(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval("SELECT count(*) FROM webhook_deliveries WHERE state = 'pending'")
    return count


# --- operators (mlp webhooks list|replay) ----------------------------------------------------------


async def list_deliveries(
    pool: asyncpg.Pool,
    *,
    state: DeliveryState | None = None,
    webhook_id: str | None = None,
    user_id: str | None = None,
    limit: int = 100,
) -> list[Delivery]:
    rows = await pool.fetch(
        f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE ($1::text IS NULL OR state = $1)"
        " AND ($2::text IS NULL OR webhook_id = $2) AND ($3::text IS NULL OR user_id = $3)"
        " ORDER BY delivery_id DESC LIMIT $4",
        state,
        webhook_id,
        user_id,
        limit,
    )
    return [_delivery(r) for r in rows]


async def replay(pool: asyncpg.Pool, *, delivery_ids: Sequence[int] = (), webhook_id: str | None = None) -> list[int]:
    """Re-queue deliveries: the given ones (any state), else every failed one (of ``webhook_id`` if given).
    They are due at once, with a fresh retry window and the same webhook-id; returns their ids."""
    args: list[object]
    if delivery_ids:
        where, args = "delivery_id = ANY ($1::bigint[])", [list(delivery_ids)]
    else:
        where, args = "state = 'failed' AND ($1::text IS NULL OR webhook_id = $1)", [webhook_id]
    rows = await pool.fetch(
        "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(), retry_from = now(),"
        f" delivered_at = NULL WHERE {where} RETURNING delivery_id",
        *args,
    )
    return sorted(r["delivery_id"] for r in rows)

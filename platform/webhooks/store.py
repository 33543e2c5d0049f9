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

from events.model import Event, encode_event
from webhooks.rules import DeliveryState, Outcome
from webhooks.signing import new_secret

WEBHOOK_ID_PATTERN: Final = r"^wh_[0-9a-f]{24}$"


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
    return await pool.fetchval("DELETE FROM webhooks WHERE webhook_id = $1 RETURNING true", webhook_id) is not None


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
_ENQUEUE_ONE_OFF = """
INSERT INTO webhook_deliveries (webhook_id, user_id, url, event_id, event_type, request_id, body)
SELECT NULL, user_id, url, $1, $2, $3, $4 FROM webhook_request_targets WHERE request_id = $3 AND user_id = $5
ON CONFLICT DO NOTHING
"""


async def enqueue(pool: asyncpg.Pool, event: Event) -> int:
    """One delivery per endpoint that wants ``event`` (its user's subscriptions and the request's one-off
    target), in one transaction; a redelivered event adds nothing. Returns the rows added."""
    body = encode_event(event).decode()
    args = (event.event_id, type(event).__name__, event.request_id, body, event.user_id)
    async with pool.acquire() as conn, conn.transaction():
        added = _count(await conn.execute(_ENQUEUE_SUBSCRIBED, *args))
        added += _count(await conn.execute(_ENQUEUE_ONE_OFF, *args))
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

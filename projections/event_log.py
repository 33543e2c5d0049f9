"""A request's audit trail: its domain events from the event store, in stream order, as stored.

``GET /api/v1/inference/{id}/events`` answers with these: the InferenceRequested that was submitted,
what the worker did, and the outcome with the tokens charged ("why was I charged X").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import asyncpg

from projections.postgres import Connection

# The stream's order (index event_store_stream): when each event happened, then its time-ordered id.
_STREAM = """
SELECT payload::text AS payload, payload->>'user_id' AS user_id
FROM event_store
WHERE request_id = $1
ORDER BY occurred_at, event_id
"""


@dataclass(frozen=True, slots=True)
class RequestEvents:
    user_id: str  # whose request it is (every event of a stream carries the same user)
    payloads: list[str]  # each event's JSON, as the event store holds it


async def request_events(db: asyncpg.Pool | Connection, request_id: str) -> RequestEvents | None:
    """The stream of ``request_id``, or None when the store holds no event of it."""
    rows = await db.fetch(_STREAM, request_id)
    if not rows:
        return None
    return RequestEvents(user_id=rows[0]["user_id"], payloads=[row["payload"] for row in rows])


# --- following a stream (the read API's SSE) -------------------------------------------------------

# Channel of migration 0011's trigger: NOTIFY with the request_id of every event newly stored.
EVENT_STORE_CHANNEL: Final = "mlp_event_store"

# What a follower needs to decide what to send: no payloads (a prompt or a completion can be large, and
# a stream re-reads on every wake-up); those of the events it sends are read by ``payloads_of``.
_HEADS = """
SELECT position, xmin::text AS tx, event_id::text AS event_id, type
FROM event_store
WHERE request_id = $1
ORDER BY occurred_at, event_id
"""
_PAYLOADS = """
SELECT event_id::text AS event_id, payload::text AS payload FROM event_store WHERE event_id = ANY($1::uuid[])
"""
_OWNER = """
SELECT payload->>'user_id' AS user_id FROM event_store WHERE request_id = $1 ORDER BY occurred_at, event_id LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class EventHead:
    """One stored event of a stream, without its payload: ``position`` is the insert order (bigserial),
    ``tx`` the inserting transaction (events of one transaction became visible together)."""

    position: int
    tx: str
    event_id: str
    type: str


async def stream_heads(db: asyncpg.Pool | Connection, request_id: str) -> list[EventHead]:
    """The events of ``request_id`` in stream order (the order ``request_events`` answers in)."""
    rows = await db.fetch(_HEADS, request_id)
    return [EventHead(row["position"], row["tx"], row["event_id"], row["type"]) for row in rows]


async def payloads_of(db: asyncpg.Pool | Connection, event_ids: Sequence[str]) -> dict[str, str]:
    """The stored JSON of each event id (those the store holds)."""
    if not event_ids:
        return {}
    rows = await db.fetch(_PAYLOADS, list(event_ids))
    return {row["event_id"]: row["payload"] for row in rows}


async def stream_owner(db: asyncpg.Pool | Connection, request_id: str) -> str | None:
    """The user of the stream's events (every event of a stream carries the same), or None when none is stored."""
    owner: str | None = await db.fetchval(_OWNER, request_id)
    return owner

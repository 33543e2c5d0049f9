"""A request's audit trail: its domain events from the event store, in stream order, as stored.

``GET /api/v1/inference/{id}/events`` answers with these: the InferenceRequested that was submitted,
what the worker did, and the outcome with the tokens charged ("why was I charged X").
"""

from __future__ import annotations

from dataclasses import dataclass

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

"""Which accepted requests reached a terminal state, and when: read from Postgres ``event_store``.

The terminal time is the ``recorded_at`` of the request's outcome event: the collector's
transaction time, on the same machine clock as the benchmark's submit times. Ids are looked up
in batches (``request_id = ANY($1)``) through the store's one-outcome-per-request partial index,
so tracking tens of thousands of requests costs a few index probes per id.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Final

import asyncpg

from events.model import TERMINAL_EVENTS

TERMINAL_TYPES: Final = tuple(event.__name__ for event in TERMINAL_EVENTS)
# Ids per query: large enough to be cheap per id, small enough to keep one query short.
BATCH: Final = 5000

_QUERY: Final = (
    "SELECT request_id, type, recorded_at FROM event_store"
    " WHERE request_id = ANY($1::text[]) AND type = ANY($2::text[])"
)


@dataclass(frozen=True, slots=True)
class Terminal:
    kind: str  # the event type
    submitted_at: float  # epoch seconds
    recorded_at: float  # epoch seconds


class TerminalTracker:
    """Accepted request ids (with their submit time) until each one's outcome is in the event store."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self.pending: dict[str, float] = {}  # request_id -> submitted at (epoch s), oldest first
        self.done: dict[str, Terminal] = {}
        self.lookup_failures = 0  # event-store lookups that failed (and were retried later)

    def add(self, request_id: str, submitted_at: float) -> None:
        if request_id in self.done or request_id in self.pending:
            return  # an Idempotency-Key replay: the same request, tracked once
        self.pending[request_id] = submitted_at

    async def poll(self, limit: int | None = None) -> int:
        """Look up pending ids (the oldest ``limit`` of them, or all); returns how many became terminal."""
        ids = list(self.pending)
        if limit is not None:
            ids = ids[:limit]
        found = 0
        for start in range(0, len(ids), BATCH):
            try:
                rows = await self._pool.fetch(_QUERY, ids[start : start + BATCH], list(TERMINAL_TYPES))
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
                # Postgres is briefly away (a fault under test): look again at the next poll.
                self.lookup_failures += 1
                return found
            for row in rows:
                request_id = row["request_id"]
                submitted_at = self.pending.pop(request_id, None)
                if submitted_at is not None:
                    self.done[request_id] = Terminal(row["type"], submitted_at, row["recorded_at"].timestamp())
                    found += 1
        return found

    async def wait_all(self, grace_s: float, interval_s: float = 0.25) -> list[str]:
        """Poll until every accepted request is terminal or ``grace_s`` passed; returns the ids still missing."""
        deadline = time.monotonic() + grace_s
        while True:
            await self.poll()
            if not self.pending or time.monotonic() >= deadline:
                return list(self.pending)
            await asyncio.sleep(interval_s)

    def latencies(self, request_ids: set[str] | None = None) -> list[float]:
        """Submit -> terminal in seconds, for the given ids (or all that are done)."""
        return [
            t.recorded_at - t.submitted_at for rid, t in self.done.items() if request_ids is None or rid in request_ids
        ]

    def count(self, kind: str, request_ids: set[str] | None = None) -> int:
        return sum(1 for rid, t in self.done.items() if t.kind == kind and (request_ids is None or rid in request_ids))

    def last_terminal_at(self, request_ids: set[str] | None = None) -> float | None:
        times = [t.recorded_at for rid, t in self.done.items() if request_ids is None or rid in request_ids]
        return max(times) if times else None

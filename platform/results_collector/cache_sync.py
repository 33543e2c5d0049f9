"""Keeps the Redis status cache in step with Postgres, off the acknowledgement path.

Updates are queued after their Postgres commit and written in pipelined batches by one task.
Postgres is the truth: when Redis is down the updates wait in a backlog and are retried (the cache
script is idempotent and order-independent, so late or repeated updates are harmless).

The backlog is bounded in bytes (``MLP_COLLECTOR_BACKLOG_MAX_BYTES``), not in entries: one update can
carry a whole completion. At the bound the oldest updates are dropped and only their request ids are
kept: the cache needs a resync for them, and once Redis answers again their entries are backfilled from
Postgres (the rows hold every dropped update, committed before it was queued), through the same
order-independent script, so a concurrent writer's newer status is never undone and a request that
became terminal is announced to its waiters. Dropping rather than holding back acknowledgements keeps
the projection into Postgres, the truth, going through a long Redis outage. If even the ids outgrow
their share of the bound (an eighth), the whole cache is resynced from Postgres instead (every request
updated within the cache's TTL, as ``mlp replay`` writes it). Nothing of record is lost either way; the
read API meanwhile answers from Postgres what Redis does not hold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

import asyncpg

from events.model import Event
from mlp.backoff import Backoff
from projections.queries import cache_fields_of_row, select_view_sql
from projections.replay import repopulate_cache
from projections.status_cache import StatusCache, cache_update
from results_collector import metrics
from results_collector.backlog import MIB, ByteDeque, IdSet, Update, update_bytes

log = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 64 * MIB


class Backfill(Protocol):
    """Writes cache entries from Postgres (the truth) into Redis."""

    async def requests(self, request_ids: Sequence[str]) -> int:
        """These requests' entries; returns how many rows were found."""
        ...

    async def everything(self) -> int:
        """Every request updated within the cache's TTL."""
        ...


class PostgresBackfill:
    def __init__(self, pool: asyncpg.Pool, cache: StatusCache) -> None:
        self._pool = pool
        self._cache = cache

    async def requests(self, request_ids: Sequence[str]) -> int:
        rows = await self._pool.fetch(select_view_sql() + "WHERE r.request_id = ANY($1::text[])", list(request_ids))
        updates = []
        for row in rows:
            fields = cache_fields_of_row(row)
            updates.append((row["request_id"], fields.pop("status"), fields))
        await self._cache.advance_many(updates)
        return len(rows)

    async def everything(self) -> int:
        async with self._pool.acquire() as conn:
            return await repopulate_cache(conn, self._cache)


class CacheSync:
    def __init__(
        self,
        cache: StatusCache,
        backfill: Backfill,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        batch_size: int = 500,
        backoff: Backoff = Backoff(base_s=0.2, cap_s=5.0, jitter=0.5),
    ) -> None:
        self._cache = cache
        self._backfill = backfill
        self._backlog: ByteDeque[Update] = ByteDeque(update_bytes)
        self._stale = IdSet()  # requests whose updates were dropped: backfilled from Postgres
        self._resync_all = False  # the ids outgrew their share too: the whole cache is backfilled
        self._max_bytes = max_bytes
        self._max_stale_bytes = max_bytes // 8
        self._batch_size = batch_size
        self._backoff = backoff
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    @property
    def held_bytes(self) -> int:
        """What the backlog and the ids to resync hold: at most ``max_bytes``."""
        return self._backlog.bytes + self._stale.bytes

    @property
    def needs_resync(self) -> bool:
        return bool(self._stale) or self._resync_all

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="status-cache-sync")

    def push(self, events: Iterable[Event]) -> None:
        """Queue the cache updates of newly stored events (never blocks, never raises)."""
        for event in events:
            self._backlog.append(cache_update(event))
        dropped = 0
        while self.held_bytes > self._max_bytes and self._backlog:
            request_id, _, _ = self._backlog.popleft()
            self._mark_stale(request_id)
            dropped += 1
        if dropped:
            metrics.CACHE_DROPPED.inc(dropped)
            log.warning(
                "status cache backlog at its bound (%d bytes): dropped %d oldest update(s); their entries are "
                "resynced from Postgres when Redis answers",
                self._max_bytes,
                dropped,
            )
        self._observe()
        self._wake.set()

    def _mark_stale(self, request_id: str) -> None:
        if self._resync_all:
            return
        self._stale.add(request_id)
        if self._stale.bytes > self._max_stale_bytes:
            log.error(
                "status cache: %d requests to resync outgrew %d bytes; the whole cache is resynced from Postgres "
                "when Redis answers",
                len(self._stale),
                self._max_stale_bytes,
            )
            self._stale.clear()
            self._resync_all = True

    def _observe(self) -> None:
        metrics.CACHE_BACKLOG.set(len(self._backlog))
        metrics.CACHE_BACKLOG_BYTES.set(self.held_bytes)
        metrics.CACHE_RESYNC_PENDING.set(-1 if self._resync_all else len(self._stale))

    async def close(self, timeout_s: float) -> None:
        """Write what is queued if Redis answers within the timeout, then stop."""
        self._closing = True
        self._wake.set()
        if self._task is None:
            return
        done, _ = await asyncio.wait({self._task}, timeout=timeout_s)
        if not done:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._backlog or self.needs_resync:
            log.warning(
                "status cache: %d update(s) not written and %s at shutdown (Postgres has them; the read API "
                "answers from it, `mlp replay` rewrites the cache)",
                len(self._backlog),
                "the whole cache to resync" if self._resync_all else f"{len(self._stale)} entr(ies) to resync",
            )

    async def _run(self) -> None:
        delays = self._backoff.delays()
        while True:
            if not self._backlog and not self.needs_resync:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self._step()
            except Exception as exc:  # Redis (or, for a resync, Postgres) down or slow: keep it all for later
                metrics.CACHE_ERRORS.inc()
                log.warning("status cache update failed (%r); %d update(s) kept for retry", exc, len(self._backlog))
                if self._closing:
                    return
                await asyncio.sleep(next(delays))
                continue
            delays = self._backoff.delays()  # Redis answered: the next outage starts short again
            self._observe()

    async def _step(self) -> None:
        """One batch of updates, then one step of resync; what fails is kept."""
        if self._backlog:
            batch = self._backlog.take(self._batch_size)
            try:
                await self._cache.advance_many(batch)
            except BaseException:
                self._backlog.put_back(batch)
                raise
        if self._resync_all:
            self._resync_all = False  # drops from now on are ids again: this backfill reads Postgres after them
            try:
                found = await self._backfill.everything()
            except BaseException:
                self._resync_all = True
                raise
            metrics.CACHE_RESYNCED.inc(found)
            log.warning("status cache resynced from Postgres: %d entries", found)
        elif self._stale:
            ids = self._stale.take(self._batch_size)
            try:
                found = await self._backfill.requests(ids)
            except BaseException:
                for request_id in ids:
                    self._stale.add(request_id)
                raise
            metrics.CACHE_RESYNCED.inc(found)

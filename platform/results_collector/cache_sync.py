"""Keeps the Redis status cache in step with Postgres, off the acknowledgement path.

Updates are queued after their Postgres commit and written in pipelined batches by one task.
Postgres is the truth: when Redis is down the updates wait in a bounded backlog and are retried
(the cache script is idempotent and order-independent, so late or repeated updates are harmless);
beyond the bound the oldest are dropped with a warning (the read API falls back to Postgres for
entries Redis does not have, and ``mlp replay`` rebuilds the cache).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Iterable, Mapping

from events.model import Event
from mlp.backoff import Backoff
from projections.status_cache import StatusCache, cache_update
from results_collector import metrics

log = logging.getLogger(__name__)

Update = tuple[str, str, Mapping[str, str]]


class CacheSync:
    def __init__(
        self,
        cache: StatusCache,
        *,
        max_backlog: int = 100_000,
        batch_size: int = 500,
        backoff: Backoff = Backoff(base_s=0.2, cap_s=5.0, jitter=0.5),
    ) -> None:
        self._cache = cache
        self._backlog: deque[Update] = deque()
        self._max_backlog = max_backlog
        self._batch_size = batch_size
        self._backoff = backoff
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    @property
    def backlog(self) -> int:
        return len(self._backlog)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="status-cache-sync")

    def push(self, events: Iterable[Event]) -> None:
        """Queue the cache updates of newly stored events (never blocks, never raises)."""
        for event in events:
            self._backlog.append(cache_update(event))
        dropped = 0
        while len(self._backlog) > self._max_backlog:
            self._backlog.popleft()
            dropped += 1
        if dropped:
            metrics.CACHE_DROPPED.inc(dropped)
            log.warning("status cache backlog full: dropped %d oldest update(s)", dropped)
        metrics.CACHE_BACKLOG.set(len(self._backlog))
        self._wake.set()

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
        if self._backlog:
            log.warning("status cache: %d update(s) not written at shutdown (Postgres has them)", len(self._backlog))

    async def _run(self) -> None:
        delays = self._backoff.delays()
        while True:
            if not self._backlog:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._backlog.popleft() for _ in range(min(self._batch_size, len(self._backlog)))]
            try:
                await self._cache.advance_many(batch)
            except Exception as exc:  # Redis down or slow: log and keep the updates for later
                self._backlog.extendleft(reversed(batch))
                metrics.CACHE_ERRORS.inc()
                log.warning("status cache update failed (%r); %d update(s) kept for retry", exc, len(self._backlog))
                if self._closing:
                    return
                await asyncio.sleep(next(delays))
                continue
            delays = self._backoff.delays()  # Redis answered: the next outage starts short again
            metrics.CACHE_BACKLOG.set(len(self._backlog))

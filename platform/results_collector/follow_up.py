"""Work that follows a commit, off the acknowledgement path: answer unserved requests, settle quota.

- Newly stored requests for a model nobody serves get an ``InferenceRejected(unknown_model)``
  (see ``guards.unserved_rejections``), published confirmed, with retries.
- Newly stored completions are committed to the Redis quota ledger too. The worker commits
  first, so this is usually a no-op (commit is idempotent by request_id); it closes the gap
  where Redis lost the worker's commit before the ledger row existed (a Redis restart).
Failures are logged and retried a few times; Postgres already holds the truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Iterable

from events.model import Event, InferenceCompleted
from mlp.backoff import Backoff
from mlp.bus import EventPublisher
from quota.service import QuotaService
from results_collector.guards import unserved_rejections

log = logging.getLogger(__name__)
_ATTEMPTS = 5
_BACKOFF = Backoff(base_s=0.4, cap_s=5.0)  # 0.4, 0.8, 1.6, 3.2, 5 s
# Events handled at once: their quota commits share Redis pipelines (quota.script_pipeline).
_CONCURRENCY = 256


class FollowUp:
    def __init__(self, publisher: EventPublisher, quota: QuotaService, served_models: Collection[str]) -> None:
        self._publisher = publisher
        self._quota = quota
        self._served = frozenset(served_models)
        self._queue: asyncio.Queue[Event] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="collector-follow-up")

    def push(self, new_events: Iterable[Event]) -> None:
        for event in new_events:
            self._queue.put_nowait(event)

    async def close(self, timeout_s: float) -> None:
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if not self._queue.empty():
            log.warning("follow-up: %d event(s) not handled at shutdown", self._queue.qsize())

    async def _run(self) -> None:
        while True:
            events = [await self._queue.get()]
            while len(events) < _CONCURRENCY and not self._queue.empty():
                events.append(self._queue.get_nowait())
            try:
                await asyncio.gather(*(self._handle(event) for event in events))
            finally:
                for _ in events:
                    self._queue.task_done()

    async def _handle(self, event: Event) -> None:
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                if isinstance(event, InferenceCompleted):
                    await self._quota.commit(
                        event.request_id, event.total_tokens, user_id=event.user_id, at=event.occurred_at
                    )
                for rejection in unserved_rejections([event], self._served):
                    await self._publisher.publish(rejection)
                return
            except Exception as exc:
                log.warning("follow-up of %s failed (attempt %d): %r", event.request_id, attempt, exc)
                await asyncio.sleep(_BACKOFF.delay(attempt - 1))
        log.error("follow-up of %s %s gave up", type(event).__name__, event.request_id)

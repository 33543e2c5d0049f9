"""Work that follows a commit, off the acknowledgement path: answer unserved requests, settle quota.

- Requests the collector did not store (``guards.unstorable_request``) for a model no worker serves
  get their ``InferenceRejected`` (``unknown_model``, or the limit they broke), published confirmed,
  with retries (``refuse``; a served model's worker answers its own).
  Request identity (docs/bus.md): the rejection goes on the request only when its claim allows
  (``QuotaService.refuse``: this message claims the id as refused, or had); when the id names another
  request the publisher alone is answered (``duplicate_request_id``), and a request id its user may
  not name is answered on a fresh id in the user's namespace.
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
from dataclasses import dataclass

from events.identity import claim_of, duplicate_rejection, publisher_rejection
from events.model import Event, InferenceCompleted, InferenceRejected, InferenceRequested, encode_event
from events.request_rules import Rejection, may_name
from mlp.backoff import Backoff
from mlp.bus import EventPublisher
from quota.service import QuotaService
from results_collector.guards import rejected_on_request

log = logging.getLogger(__name__)
_ATTEMPTS = 5
_BACKOFF = Backoff(base_s=0.4, cap_s=5.0)  # 0.4, 0.8, 1.6, 3.2, 5 s
# Events handled at once: their quota commits share Redis pipelines (quota.script_pipeline).
_CONCURRENCY = 256


@dataclass(frozen=True)
class Refusal:
    """A request the collector did not store, with why."""

    request: InferenceRequested
    rejection: Rejection


class FollowUp:
    def __init__(self, publisher: EventPublisher, quota: QuotaService, served_models: Collection[str]) -> None:
        self._publisher = publisher
        self._quota = quota
        self._served = frozenset(served_models)
        self._queue: asyncio.Queue[Event | Refusal] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="collector-follow-up")

    def push(self, new_events: Iterable[Event]) -> None:
        for event in new_events:
            self._queue.put_nowait(event)

    def refuse(self, request: InferenceRequested, rejection: Rejection) -> None:
        """A request not stored: answered here when no worker serves its model (a worker answers its own)."""
        if request.model not in self._served:
            self._queue.put_nowait(Refusal(request, rejection))

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

    async def _handle(self, item: Event | Refusal) -> None:
        event = item.request if isinstance(item, Refusal) else item
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                match item:
                    case Refusal(request=request, rejection=rejection):
                        await self._answer(request, rejection)
                    case InferenceCompleted():
                        # The outcome is kept with the claim too (a redelivery is answered with it).
                        await self._quota.commit(
                            item.request_id,
                            item.total_tokens,
                            user_id=item.user_id,
                            at=item.occurred_at,
                            outcome=encode_event(item),
                        )
                return
            except Exception as exc:
                log.warning("follow-up of %s failed (attempt %d): %r", event.request_id, attempt, exc)
                await asyncio.sleep(_BACKOFF.delay(attempt - 1))
        log.error("follow-up of %s %s gave up", type(event).__name__, event.request_id)

    async def _answer(self, request: InferenceRequested, rejection: Rejection) -> None:
        answer = await self._addressed(request, rejection)
        if answer is not None:
            await self._publisher.publish(answer)

    async def _addressed(self, request: InferenceRequested, rejection: Rejection) -> InferenceRejected | None:
        """The rejection, addressed as the request's claim allows; None when the request is answered already."""
        if not may_name(request.user_id, request.request_id):
            return publisher_rejection(
                user_id=request.user_id,
                model=request.model,
                event_id=request.event_id,
                named=request.request_id,
                reason=rejection.reason,
                detail=rejection.message,
                traceparent=request.traceparent,
            )
        verdict = await self._quota.refuse(request.request_id, request.user_id, claim_of(request), rejection)
        match verdict.answer:
            case "refused":
                return rejected_on_request(request, verdict.rejection or rejection)
            case "conflict":
                return duplicate_rejection(request)
        return None  # its claim ended already (or runs): it has, or will have, its own outcome

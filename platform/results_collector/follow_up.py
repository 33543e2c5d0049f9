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

The queue is bounded in bytes (``MLP_COLLECTOR_FOLLOW_UP_MAX_BYTES``; it fills when Redis is slow or away).
At the bound the two kinds of work are treated apart, so that nothing of record is lost:
- a quota commit is not queued (counted in ``mlp_collector_follow_up_shed_total``): the worker committed
  the request before publishing it, this one only closes a rare gap, and while the queue is full Redis is
  failing them anyway; the ledger row is in Postgres, and ``mlp reconcile`` finds Redis counters that
  differ from it (``--repair`` rebuilds them);
- a refusal is the only answer its request gets: it waits for room (the message is not acknowledged
  meanwhile, which holds back the consumer: backpressure), and at shutdown it is requeued, not dropped.
Only completions are queued (compact: the encoded outcome, not the event); other events need no follow-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import datetime

from events.identity import claim_of, duplicate_rejection, publisher_rejection
from events.model import Event, InferenceCompleted, InferenceRejected, InferenceRequested, encode_event
from events.request_rules import Rejection, may_name
from mlp.backoff import Backoff
from mlp.bus import EventPublisher
from quota.service import QuotaService
from results_collector import metrics
from results_collector.backlog import MIB
from results_collector.guards import rejected_on_request

log = logging.getLogger(__name__)
_ATTEMPTS = 5
_BACKOFF = Backoff(base_s=0.4, cap_s=5.0)  # 0.4, 0.8, 1.6, 3.2, 5 s
# Events handled at once: their quota commits share Redis pipelines (quota.script_pipeline).
_CONCURRENCY = 256
DEFAULT_MAX_BYTES = 32 * MIB
# What a queued item holds besides its strings (the dataclass, the queue's tuple, an event's other fields).
_ITEM_OVERHEAD_BYTES = 512


@dataclass(frozen=True, slots=True)
class Refusal:
    """A request the collector did not store, with why."""

    request: InferenceRequested
    rejection: Rejection


@dataclass(frozen=True, slots=True)
class Commit:
    """A newly stored completion's quota commit; ``outcome``: the encoded event, kept with the claim."""

    request_id: str
    user_id: str
    tokens: int
    at: datetime
    outcome: bytes


Item = Commit | Refusal


def item_bytes(item: Item) -> int:
    """What a queued item holds in memory (an estimate that errs high). Pure."""
    strings: tuple[str | bytes, ...]
    match item:
        case Commit():
            strings = (item.request_id, item.user_id, item.outcome)
        case Refusal(request=request, rejection=rejection):
            strings = (request.request_id, request.user_id, request.prompt, request.event_id, rejection.message)
    return _ITEM_OVERHEAD_BYTES + sum(sys.getsizeof(s) for s in strings)


def commit_of(event: InferenceCompleted) -> Commit:
    # The outcome is kept with the claim too (a redelivery is answered with it).
    return Commit(event.request_id, event.user_id, event.total_tokens, event.occurred_at, encode_event(event))


class FollowUp:
    def __init__(
        self,
        publisher: EventPublisher,
        quota: QuotaService,
        served_models: Collection[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        self._publisher = publisher
        self._quota = quota
        self._served = frozenset(served_models)
        self._queue: asyncio.Queue[tuple[Item, int]] = asyncio.Queue()
        self._max_bytes = max_bytes
        self._bytes = 0
        self._room = asyncio.Event()
        self._room.set()
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="collector-follow-up")

    def push(self, new_events: Iterable[Event]) -> None:
        """The quota commits of newly stored completions; at the bound they are shed (see the module)."""
        shed = 0
        for event in new_events:
            if not isinstance(event, InferenceCompleted):
                continue
            item = commit_of(event)
            size = item_bytes(item)
            if not self._fits(size):
                shed += 1
                continue
            self._put(item, size)
        if shed:
            metrics.FOLLOW_UP_SHED.inc(shed)
            log.warning("follow-up queue at its bound (%d bytes): %d quota commit(s) not queued", self._max_bytes, shed)

    async def refuse(self, request: InferenceRequested, rejection: Rejection) -> bool:
        """A request not stored: answered here when no worker serves its model (a worker answers its own).
        Waits for room at the bound; False when the follow-up closed meanwhile (requeue the message)."""
        if request.model in self._served:
            return True
        item = Refusal(request, rejection)
        size = item_bytes(item)
        while not self._fits(size):
            if self._closed:
                return False
            self._room.clear()
            await self._room.wait()
        if self._closed:
            return False
        self._put(item, size)
        return True

    def _fits(self, size: int) -> bool:
        # An item larger than the whole bound still goes through, alone.
        return self._bytes + size <= self._max_bytes or self._bytes == 0

    def _put(self, item: Item, size: int) -> None:
        self._queue.put_nowait((item, size))
        self._bytes += size
        metrics.FOLLOW_UP_BYTES.set(self._bytes)

    def _done(self, size: int) -> None:
        self._queue.task_done()
        self._bytes -= size
        metrics.FOLLOW_UP_BYTES.set(self._bytes)
        self._room.set()

    async def close(self, timeout_s: float) -> None:
        self._closed = True
        self._room.set()  # refusals waiting for room are requeued
        if self._task is None:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), timeout_s)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        if not self._queue.empty():
            log.warning("follow-up: %d item(s) not handled at shutdown", self._queue.qsize())

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < _CONCURRENCY and not self._queue.empty():
                items.append(self._queue.get_nowait())
            try:
                await asyncio.gather(*(self._handle(item) for item, _ in items))
            finally:
                for _, size in items:
                    self._done(size)

    async def _handle(self, item: Item) -> None:
        request_id = item.request.request_id if isinstance(item, Refusal) else item.request_id
        for attempt in range(1, _ATTEMPTS + 1):
            try:
                match item:
                    case Refusal(request=request, rejection=rejection):
                        await self._answer(request, rejection)
                    case Commit():
                        await self._quota.commit(
                            item.request_id, item.tokens, user_id=item.user_id, at=item.at, outcome=item.outcome
                        )
                return
            except Exception as exc:
                log.warning("follow-up of %s failed (attempt %d): %r", request_id, attempt, exc)
                await asyncio.sleep(_BACKOFF.delay(attempt - 1))
        log.error("follow-up %s of %s gave up", type(item).__name__, request_id)

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

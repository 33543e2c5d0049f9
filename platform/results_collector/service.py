"""The collector's message handling: decode, batch, store-and-project, then acknowledge.

The bus adapter decides ack/nack/reject here and nowhere else:
- a bus publisher's ``CancelInference`` command (events.control; the worker acts on it) -> ``ack``;
- a body that is not a valid event, or an event the store would refuse -> ``reject`` (no requeue):
  the queue's dead-letter exchange moves it to ``mlp.projections.dlq``; the reason is logged;
- an untrusted request beyond the platform's limits, for a model nobody serves, or under a request id
  its user may not name -> ``ack`` without storing it (``guards.unstorable_request``): its rejection is
  stored instead when it arrives (the worker's; the follow-up's for a model no worker serves);
- a request whose id another request already claimed (the quota's claim, the one the worker checks too)
  -> ``ack`` without storing it: the stream's owner is the claim's, whichever consumer saw it first; the
  worker answers its publisher with ``duplicate_request_id``;
- written (newly stored, or a duplicate already stored) -> ``ack``, only after the commit, in bulk: one
  ``multiple`` ack for a run of written deliveries (``mlp.acks``);
- Postgres down -> the handler keeps waiting while its batch is retried (the message stays unacked;
  no requeue, which a quorum queue would count towards its delivery limit);
- shutting down before it was written -> ``nack(requeue=True)``, never a reject.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

import asyncpg
from faststream.rabbit import RabbitMessage
from opentelemetry.trace import SpanContext

from events.control import cancel_command
from events.identity import RequestClaim, claim_of
from events.model import AnyEvent, EventDecodeError, InferenceRequested, decode_event
from events.request_rules import RequestLimits
from mlp import metrics as platform_metrics
from mlp.acks import BulkAcker
from mlp.backoff import Backoff
from projections.postgres import is_transient, store_and_project
from projections.projector import invalid_reason
from projections.status_cache import StatusKeys
from quota.ledger import QuotaUnavailable
from results_collector import metrics
from results_collector.batcher import WRITE_BACKOFF, Batcher, ItemFailed, ShuttingDown
from results_collector.cache_sync import CacheSync
from results_collector.follow_up import FollowUp
from results_collector.guards import routing_mismatch, unstorable_request
from results_collector.tracing import batch_span, consumer_parent, record_stored

log = logging.getLogger(__name__)


class Claims(Protocol):
    """The request-id claim (quota.service.QuotaService.claim): False when the id names another request."""

    async def claim(
        self, request_id: str, user_id: str, claim: RequestClaim, *, status_key: str | None = None
    ) -> bool: ...


@dataclass(frozen=True)
class Incoming:
    event: AnyEvent
    body: bytes  # stored verbatim: fields of a newer schema survive in the event store
    # The span its projection span goes under (the consumer's process span); None when tracing is off.
    trace_parent: SpanContext | None = None


class Collector:
    """Stores and projects events in batches; owns the batcher and the status cache sync."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        cache_sync: CacheSync,
        *,
        batch_size: int,
        batch_wait_s: float,
        backoff: Backoff = WRITE_BACKOFF,
        limits: RequestLimits,
        follow_up: FollowUp | None = None,
        claims: Claims | None = None,
        status_keys: StatusKeys | None = None,
        acks: BulkAcker | None = None,
    ) -> None:
        """``limits``: the platform's request limits and served models (guards.unstorable_request);
        ``claims``: who owns a request id (None: every storable request is stored, as in unit tests)."""
        self._claims = claims
        # One multiple ack per run of written events (mlp.acks), not one frame per event.
        self._acks = acks or BulkAcker()
        self._status_keys = status_keys
        self._pool = pool
        self._cache_sync = cache_sync
        self._follow_up = follow_up
        self._limits = limits
        self._batcher: Batcher[Incoming, bool] = Batcher(
            self._write,
            max_size=batch_size,
            max_wait_s=batch_wait_s,
            is_transient=is_transient,
            backoff=backoff,
            name="projection-batcher",
        )

    @property
    def batcher(self) -> Batcher[Incoming, bool]:
        return self._batcher

    def start(self) -> None:
        self._batcher.start()
        self._cache_sync.start()
        if self._follow_up is not None:
            self._follow_up.start()

    async def close(self, drain_timeout_s: float) -> None:
        await self._batcher.close(drain_timeout_s)
        await self._acks.close()
        await self._cache_sync.close(timeout_s=min(5.0, drain_timeout_s))
        if self._follow_up is not None:
            await self._follow_up.close(timeout_s=min(5.0, drain_timeout_s))

    async def handle(self, message: RabbitMessage) -> None:
        body: bytes = message.body
        try:
            event = decode_event(body)
        except EventDecodeError as exc:
            if cancel_command(body) is not None:  # a bus publisher's cancel (the worker's): not an event
                metrics.EVENTS.labels("CancelInference", "ignored").inc()
                self._acks.done(message)
                return
            await self._reject(message, "undecodable", str(exc))
            return
        if (
            reason := invalid_reason(event) or routing_mismatch(event, message.raw_message.routing_key or "")
        ) is not None:
            await self._reject(message, type(event).__name__, reason)
            return
        if isinstance(event, InferenceRequested):
            refusal = unstorable_request(event, len(body), self._limits)
            if refusal is not None:
                metrics.EVENTS.labels(type(event).__name__, "refused").inc()
                log.info("request %s not stored (%s): %s", event.request_id[:200], refusal.reason, refusal.message)
                if self._follow_up is not None and not await self._follow_up.refuse(event, refusal):
                    metrics.EVENTS.labels(type(event).__name__, "requeued").inc()
                    await self._requeue(message)  # shutting down while its answer waited for room
                    return
                self._acks.done(message)
                return
            if not await self._claimed(event):
                metrics.EVENTS.labels(type(event).__name__, "refused").inc()
                log.info("request %s not stored: the id names another request", event.request_id[:200])
                self._acks.done(message)
                return
        try:
            newly_stored = await self._batcher.submit(Incoming(event, body, consumer_parent(event)))
        except ItemFailed as exc:
            await self._reject(message, type(event).__name__, str(exc))
            return
        except ShuttingDown:
            metrics.EVENTS.labels(type(event).__name__, "requeued").inc()
            await self._requeue(message)
            return
        metrics.EVENTS.labels(type(event).__name__, "stored" if newly_stored else "duplicate").inc()
        self._acks.done(message)

    async def _claimed(self, request: InferenceRequested) -> bool:
        """Whether the request is its message's to store. Redis down: stored (the worker cannot claim either
        then, and the projection keeps going through a Redis outage); logged."""
        if self._claims is None:
            return True
        status_key = self._status_keys.status(request.request_id) if self._status_keys is not None else None
        try:
            return await self._claims.claim(
                request.request_id, request.user_id, claim_of(request), status_key=status_key
            )
        except QuotaUnavailable as exc:
            log.warning("request %s stored unclaimed, the claim is unavailable: %s", request.request_id[:200], exc)
            return True

    async def _reject(self, message: RabbitMessage, kind: str, reason: str) -> None:
        metrics.EVENTS.labels(kind, "rejected").inc()
        log.warning(
            "rejecting message %s to the dead-letter queue: %s",
            message.message_id,
            reason[:500],
            extra={"message_id": message.message_id, "reason": reason[:500]},
        )
        await message.reject(requeue=False)
        self._acks.settled(message)

    async def _requeue(self, message: RabbitMessage) -> None:
        await message.nack(requeue=True)
        self._acks.settled(message)

    async def _write(self, items: list[Incoming]) -> Sequence[bool]:
        with batch_span([i.trace_parent for i in items]) as batch:
            stored = await self._store(items)
            record_stored(batch, [(i.event, i.trace_parent) for i, new in zip(items, stored, strict=True) if new])
        return stored

    async def _store(self, items: list[Incoming]) -> Sequence[bool]:
        started = time.perf_counter()
        try:
            new = await store_and_project(self._pool, [i.event for i in items], [i.body for i in items])
        except Exception:
            metrics.WRITE_ERRORS.inc()
            raise
        metrics.BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.BATCH_SIZE.observe(len(items))
        now = datetime.now(UTC)
        for event in new:
            metrics.PROJECTION_DELAY.observe(max(0.0, (now - event.occurred_at).total_seconds()))
            platform_metrics.record_projected(type(event).__name__, event.occurred_at, now)
        self._cache_sync.push(new)
        if self._follow_up is not None:
            self._follow_up.push(new)
        # The same objects as the items' (a second copy of an id within the batch is not new: a duplicate).
        new_events = {id(e) for e in new}
        return [id(i.event) in new_events for i in items]

"""The dispatcher: enqueue on outcome events (of the users with a webhook: the queue is bound per user,
webhook_dispatcher.bindings) and one-off targets from the event store, deliver from Postgres.

The bus adapter decides ack/nack/reject here and nowhere else:
- a body that is not a valid event -> ``reject`` (dead-lettered, as the collector does);
- an event on another routing key than its own (forged by a publisher), or not an outcome -> ``ack``, dropped;
- an outcome -> its deliveries are inserted in one transaction, then ``ack`` (Postgres down: retried with
  backoff while the message stays unacked; shutting down first -> ``nack(requeue=True)``).

A request's one-off ``webhook_url`` takes no bus: every ``MLP_WEBHOOK_TARGET_SCAN_S`` the target scan
enqueues the targets whose request has an outcome in the event store (``store.enqueue_one_off_targets``; the
targets table holds only the pending ones, so with none it reads nothing).

The delivery loop claims due rows (``webhooks.store.claim_due``: FOR UPDATE SKIP LOCKED, a lease), sends
them concurrently and records each outcome. A dispatcher killed mid-attempt loses nothing: the row stays
pending and is due again when its lease ends, for this replica or another, with the same webhook-id.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from datetime import datetime

import asyncpg
from faststream.rabbit import RabbitMessage

from events.model import EventDecodeError, decode_event, utc_now
from events.topology import routing_key
from mlp.backoff import Backoff
from webhook_dispatcher import metrics
from webhook_dispatcher.sender import AttemptResult, Sender
from webhooks import store
from webhooks.rules import RetryPolicy, after_attempt, is_delivered

log = logging.getLogger(__name__)

# Postgres cannot answer now (down, restarting, out of connections, a conflict) or is not set up for it
# yet (a migration or a grant missing: an operator's fix): retried. Any other PostgresError is about the
# data: the message is dead-lettered instead of retried without end.
DB_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.SyntaxOrAccessError,
)
_ENQUEUE_BACKOFF = Backoff(base_s=0.2, cap_s=5.0, jitter=0.5)
_PENDING_EVERY_S = 5.0  # how often the pending gauge is counted (a count over the pending rows)


class Dispatcher:
    def __init__(
        self,
        pool: asyncpg.Pool,
        sender: Sender,
        policy: RetryPolicy,
        *,
        concurrency: int,
        poll_interval_s: float,
        lease_s: float,
        target_scan_s: float = 1.0,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._pool = pool
        self._sender = sender
        self._policy = policy
        self._concurrency = concurrency
        self._poll_interval_s = poll_interval_s
        self._lease_s = lease_s
        self._target_scan_s = target_scan_s
        self._clock = clock
        self._wake = asyncio.Event()
        self._closing = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._scan_task: asyncio.Task[None] | None = None
        self._pending_at = float("-inf")

    # --- enqueue (the bus side) ----------------------------------------------------------------

    async def handle(self, message: RabbitMessage) -> None:
        try:
            event = decode_event(message.body)
        except EventDecodeError as exc:
            log.warning("rejecting message %s to the dead-letter queue: %s", message.message_id, str(exc)[:500])
            await message.reject(requeue=False)
            return
        delivered_with = message.raw_message.routing_key or ""
        if not is_delivered(event) or delivered_with != routing_key(event):
            if is_delivered(event):
                log.warning(
                    "dropping %s %s: it arrived on routing key %r",
                    type(event).__name__,
                    event.event_id,
                    delivered_with[:200],
                )
            await message.ack()
            return
        added = 0
        for attempt in itertools.count():
            try:
                added = await store.enqueue(self._pool, event)
                break
            except DB_ERRORS as exc:
                log.warning("enqueue of %s failed, retrying: %r", event.event_id, exc)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_ENQUEUE_BACKOFF.delay(attempt)):
                        await self._closing.wait()
                if self._closing.is_set():
                    await message.nack(requeue=True)
                    return
            except asyncpg.PostgresError as exc:  # about the data, not the server: retrying will not help
                log.warning("rejecting %s to the dead-letter queue: Postgres refused it: %r", event.event_id, exc)
                await message.reject(requeue=False)
                return
        if added:
            metrics.ENQUEUED.inc(added)
            self._wake.set()
        await message.ack()

    # --- deliver (the Postgres side) -----------------------------------------------------------

    def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run(), name="webhook-deliveries")
        self._scan_task = asyncio.create_task(self._scan_targets(), name="webhook-target-scan")

    def wake(self) -> None:
        """Deliveries were enqueued elsewhere (the bindings' catch-up): claim now."""
        self._wake.set()

    async def close(self, timeout_s: float) -> None:
        """Stop claiming; attempts in flight get ``timeout_s`` to finish (an unfinished one stays pending)."""
        self._closing.set()
        self._wake.set()
        if self._scan_task is not None:
            self._scan_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._scan_task
            self._scan_task = None
        if self._loop_task is None:
            return
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(self._loop_task)
        except TimeoutError:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        self._loop_task = None

    async def _run(self) -> None:
        """Keep up to ``concurrency`` attempts in flight: claim as many due deliveries as there are free slots,
        again whenever a slot frees, a new delivery is enqueued (the wake) or the poll interval passes. A slow
        endpoint holds one slot, never the others' turn."""
        inflight: set[asyncio.Task[None]] = set()
        failures = 0
        try:
            while not self._closing.is_set():
                free = self._concurrency - len(inflight)
                claimed = 0
                if free > 0:
                    self._wake.clear()
                    try:
                        due = await store.claim_due(self._pool, free, self._lease_s)
                        failures = 0
                    except DB_ERRORS as exc:
                        log.warning("delivery loop: Postgres unavailable: %r", exc)
                        due, failures = [], failures + 1
                    except Exception:  # a bug must not end the loop: logged, retried after a pause
                        log.exception("delivery loop: unexpected error")
                        due, failures = [], failures + 1
                    for one in due:
                        task = asyncio.create_task(self._deliver(one), name=f"webhook-delivery-{one.delivery_id}")
                        inflight.add(task)
                        task.add_done_callback(inflight.discard)
                    claimed = len(due)
                    await self._refresh_pending()
                if free > 0 and claimed == free:
                    continue  # every free slot taken: more may be due at once
                wait_s = self._poll_interval_s if not failures else _ENQUEUE_BACKOFF.delay(failures)
                wake = asyncio.create_task(self._wake.wait())
                try:
                    await asyncio.wait({wake, *inflight}, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    wake.cancel()
        except asyncio.CancelledError:
            for task in inflight:
                task.cancel()  # past the drain's bound: those rows stay pending, due again after their lease
            raise
        finally:
            if inflight:
                await asyncio.gather(*inflight, return_exceptions=True)

    async def _scan_targets(self) -> None:
        """Enqueue the one-off targets whose request has an outcome, every ``target_scan_s``."""
        failures = 0
        while not self._closing.is_set():
            try:
                added = await store.enqueue_one_off_targets(self._pool)
                failures = 0
            except DB_ERRORS as exc:
                log.warning("target scan: Postgres unavailable: %r", exc)
                added, failures = 0, failures + 1
            except Exception:  # a bug must not end the scan: logged, retried after a pause
                log.exception("target scan: unexpected error")
                added, failures = 0, failures + 1
            if added:
                metrics.ENQUEUED.inc(added)
                self._wake.set()
            wait_s = self._target_scan_s if not failures else _ENQUEUE_BACKOFF.delay(failures)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await self._closing.wait()

    async def _refresh_pending(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._pending_at < _PENDING_EVERY_S:
            return
        self._pending_at = now
        with contextlib.suppress(*DB_ERRORS):
            metrics.PENDING.set(await store.pending_count(self._pool))

    async def _deliver(self, due: store.DueDelivery) -> None:
        try:
            result = await self._sender.attempt(due)
        except Exception as exc:  # one bad delivery must not hold up the others: a failed attempt
            log.exception("webhook delivery %d: unexpected error", due.delivery_id)
            result = AttemptResult(None, f"internal error: {type(exc).__name__}")
        outcome = after_attempt(
            ok=result.ok, attempts=due.attempts, created_at=due.retry_from, now=self._clock(), policy=self._policy
        )
        try:
            recorded = await store.record_attempt(
                self._pool, due, outcome, status_code=result.status_code, error=result.error
            )
        except DB_ERRORS as exc:  # the row stays pending: attempted again after its lease (same webhook-id)
            log.warning("webhook delivery %d: its outcome could not be recorded: %r", due.delivery_id, exc)
            return
        if not recorded:
            return
        metrics.DELIVERIES.labels(outcome="retry" if outcome.state == "pending" else outcome.state).inc()
        if outcome.state == "failed":
            log.warning(
                "webhook delivery %d (event %s) failed after %d attempts: %s",
                due.delivery_id,
                due.event_id,
                due.attempts,
                result.error,
            )

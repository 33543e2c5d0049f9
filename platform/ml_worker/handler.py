"""The requests-queue handler: decode, ask the pure decisions, apply them, then ack.

Ack discipline (manual): a message is acked only after its outcome event was confirmed by
the broker; an unconfirmed publish or a dependency outage retries in process, then requeues; a bug
requeues at once. On the last allowed delivery (``x-delivery-count``, events.topology.DELIVERY_LIMIT),
where a requeue would dead-letter it with no outcome, whatever the cause (a bug, an outage that outlasted
every delivery, a shutdown) the request ends ``InferenceFailed`` with the cause (``delivery_limit_exceeded``,
``transient_exhausted``), its hold released (never a charged request: see ``_end_on_last_delivery``), and
the message is dead-lettered. When not even that can be recorded, the message still falls into the DLQ,
logged, for ``mlp dlq replay``. Before the last delivery a shutdown only ever requeues (``ml_worker.drain``).

Request identity (docs/bus.md): every event on a request's stream follows its claim. The
reservation claims the request id for the message (owner, event_id, content digest) and answers
what to do: run it, answer it again with the outcome it ended with (a committed or failed request
never reaches Triton again), refuse it, or, when the id names another request, answer the
publisher alone (``duplicate_request_id`` on a fresh id in its namespace).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

from faststream.rabbit import RabbitMessage

from events import control
from events.identity import RequestClaim, claim_of, duplicate_rejection
from events.model import (
    Event,
    EventDecodeError,
    InferenceCancelled,
    InferenceCompleted,
    InferenceExpired,
    InferenceFailed,
    InferenceRejected,
    InferenceRequested,
    InferenceStarted,
    decode_event,
    encode_event,
    utc_now,
)
from events.request_rules import Rejection, RequestLimits
from events.status import status_of
from ml_worker import decide
from ml_worker.cancels import CancelWatch, Watch
from ml_worker.decide import Commit, Outcome, Release, RunOutcome, Stopped, TritonOutcome
from ml_worker.inbound import CancelRequest, Delivery, Invalid, max_body_bytes, parse
from ml_worker.metrics import REDELIVERIES
from ml_worker.tracing import record_outcome, request_span, with_worker_traceparent
from mlp import metrics
from mlp.acks import BulkAcker
from mlp.backoff import Backoff
from mlp.bus import PublishError
from mlp.logs import bind_request_id
from projections.status_cache import StatusKeys
from quota.ledger import QuotaUnavailable

log = logging.getLogger(__name__)

# A dependency outage (an unconfirmed publish; Redis or Postgres, which the quota adapters report
# as QuotaUnavailable) is waited out in process instead of requeueing at once: every requeue
# spends one of the message's few deliveries.
TRANSIENT_ERRORS: Final[tuple[type[BaseException], ...]] = (
    PublishError,
    QuotaUnavailable,
    ConnectionError,
    TimeoutError,
)
# 0.5, 1, 2, 4, then 5 s between tries.
TRANSIENT_BACKOFF: Final = Backoff(base_s=0.5, cap_s=5.0)
# About two and a half minutes of waiting before the message is requeued after all.
TRANSIENT_MAX_TRIES: Final = 32


class Reservation(Protocol):
    @property
    def answer(self) -> str: ...  # run | finished | done | refused | conflict (quota.service.Answer)
    @property
    def rejection(self) -> Rejection | None: ...  # refused: why, worded as the gateway words it
    @property
    def outcome_event(self) -> bytes | None: ...  # done: the outcome the request ended with, when kept
    @property
    def reserved_tokens(self) -> int: ...


class Released(Protocol):
    @property
    def outcome(self) -> str: ...  # released | committed | none | conflict


class PlanLimits(Protocol):
    @property
    def plan(self) -> str: ...
    @property
    def max_timeout_s(self) -> int: ...
    @property
    def default_timeout_s(self) -> int | None: ...


class CancelAnswer(Protocol):
    @property
    def outcome(self) -> str: ...  # queued | running | cancelled | ended | unknown (quota.ledger.CancelResult)


class StatusReader(Protocol):
    """The status cache (``projections.status_cache.StatusCache.get``)."""

    async def get(self, request_id: str) -> dict[str, str] | None: ...


class Quota(Protocol):
    async def reserve(
        self,
        request_id: str,
        user_id: str,
        tokens: int,
        *,
        status_key: str | None = None,
        claim: RequestClaim | None = None,
        refusal: Rejection | None = None,
        max_tokens: int | None = None,
        count_request: bool = False,
    ) -> Reservation: ...
    async def refuse(
        self,
        request_id: str,
        user_id: str,
        claim: RequestClaim,
        rejection: Rejection,
        *,
        status_key: str | None = None,
    ) -> Reservation: ...
    async def commit(
        self,
        request_id: str,
        actual_tokens: int,
        *,
        user_id: str | None = None,
        at: datetime | None = None,
        outcome: bytes | None = None,
    ) -> Any: ...
    async def release(
        self,
        request_id: str,
        *,
        outcome: bytes | None = None,
        user_id: str | None = None,
        claim: RequestClaim | None = None,
    ) -> Released: ...
    async def limits_for(self, user_id: str) -> PlanLimits: ...
    async def cancel(
        self, request_id: str, user_id: str, *, outcome: bytes, status_key: str, channel: str, cause: str = "http"
    ) -> CancelAnswer: ...


class Publisher(Protocol):
    async def publish(self, event: Event, headers: dict[str, Any] | None = None) -> None: ...


class Inferer(Protocol):
    async def infer(self, request: InferenceRequested) -> TritonOutcome: ...


class PromptTokens(Protocol):
    """Counts a prompt with its model's tokenizer (``ml_service.tokens.TokenCounter``)."""

    def count(self, model: str, prompt: str) -> int | None: ...


class Draining(Exception):
    """The worker is shutting down: hand the message back to the queue."""


@dataclass(frozen=True)
class WorkerDeps:
    publisher: Publisher
    quota: Quota
    status_keys: StatusKeys  # the request's status-cache hash, checked by the reservation (quota.scripts.RESERVE)
    triton: Inferer
    # Bus cancels (CancelInference) read the request's status here; None: they are acknowledged, not acted on.
    status: StatusReader | None = None
    # The requests this worker holds, for the cancel channel's listener (ml_worker.cancels).
    cancels: CancelWatch = field(default_factory=CancelWatch)


class RequestHandler:
    def __init__(
        self,
        deps: WorkerDeps,
        limits: RequestLimits,
        worker_id: str,
        *,
        started_after_s: float = 0.0,
        prompt_tokens: PromptTokens | None = None,
    ) -> None:
        self._deps = deps
        self._limits = limits
        # Counts the prompts of models with an input limit in tokens (None: only characters are limited).
        self._prompt_tokens = prompt_tokens
        self._worker_id = worker_id
        # 0: InferenceStarted for every request; > 0: only for an inference slower than this.
        self._started_after_s = started_after_s
        self._max_body = max_body_bytes(limits.max_prompt_chars)
        self.draining = asyncio.Event()
        # Acks go out in bulk (mlp.acks): one multiple ack per run of finished deliveries.
        self.acks = BulkAcker()
        # In-flight deliveries, so a shutdown can requeue what it could not finish.
        self.in_flight: dict[asyncio.Task[Any], RabbitMessage] = {}

    async def handle(self, message: RabbitMessage) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.in_flight[task] = message
        try:
            await self._handle(message)
        finally:
            self.in_flight.pop(task, None)

    async def give_back(self, message: RabbitMessage) -> None:
        """A delivery a shutdown could not finish in time (``ml_worker.main.Worker.drain``): requeued, or on its
        last delivery, where the requeue would dead-letter it with no outcome, ended failed like any other cause."""
        delivery = _delivery(message)
        count = decide.delivery_count(delivery.headers)
        parsed = parse(delivery, self._max_body)
        # (a cancel command has no outcome to end with: requeued like an invalid message)
        if isinstance(parsed, Invalid | CancelRequest) or not decide.is_last_delivery(count):
            with contextlib.suppress(Exception):  # a closed channel requeues it anyway
                await message.nack(requeue=True)
            self.acks.settled(message)
            return
        with bind_request_id(parsed.request_id):
            await self._after_transient(message, parsed, count, "the worker was shutting down")

    async def _handle(self, message: RabbitMessage) -> None:
        delivery = _delivery(message)
        count = decide.delivery_count(delivery.headers)
        parsed = parse(delivery, self._max_body)
        if isinstance(parsed, Invalid):
            await self._dead_letter_invalid(message, parsed, count)
            return
        if isinstance(parsed, CancelRequest):
            with bind_request_id(parsed.request_id):
                await self._handle_cancel(message, parsed)
            return
        with bind_request_id(parsed.request_id), request_span(parsed, attempt=count + 1):
            await self._handle_request(message, parsed, count)

    async def _handle_request(self, message: RabbitMessage, parsed: InferenceRequested, count: int) -> None:
        for tries in range(1, TRANSIENT_MAX_TRIES + 1):
            try:
                await self._process(message, parsed, attempt=count + 1)
                return
            except Draining:
                await self._after_transient(message, parsed, count, "the worker was shutting down")
                return
            except TRANSIENT_ERRORS as exc:
                if self.draining.is_set() or tries == TRANSIENT_MAX_TRIES or _channel_closed(message):
                    await self._after_transient(message, parsed, count, _describe(exc))
                    return
                delay = TRANSIENT_BACKOFF.delay(tries - 1)
                log.warning("request %s: %s; retrying in %.1fs", parsed.request_id, _describe(exc), delay)
                await asyncio.sleep(delay)
            except Exception as exc:
                await self._on_unexpected(message, parsed, count, exc)
                return

    async def _process(self, message: RabbitMessage, request: InferenceRequested, *, attempt: int) -> None:
        if self.draining.is_set():
            raise Draining
        # Watched from before the reservation: a cancel landing between it and the Triton call is seen.
        with self._deps.cancels.watching(request.request_id) as watch:
            await self._process_watched(message, request, watch, attempt=attempt)

    async def _process_watched(
        self, message: RabbitMessage, request: InferenceRequested, watch: Watch, *, attempt: int
    ) -> None:
        limits = await self._deps.quota.limits_for(request.user_id)
        refusal = decide.check(request, self._limits, self._count(request)) or control.check_deadline(
            request, limits.max_timeout_s, limits.plan
        )
        if request.source == "bus" and refusal is None:  # the gateway gave its own requests the plan's default
            request = control.with_default_deadline(request, limits.default_timeout_s)
        expiry = decide.expired_before_start(request, utc_now()) if refusal is None else None
        if expiry is not None and await self._expire_queued(message, request, expiry):
            return
        estimate = decide.reservation_estimate(request, self._limits)
        # The claim, the request rules' verdict, the plan's limits and the redelivery check (is the
        # outcome already cached?) all ride in the reservation's one Redis round trip.
        status_key = self._deps.status_keys.status(request.request_id)
        reservation = await self._deps.quota.reserve(
            request.request_id,
            request.user_id,
            estimate,
            status_key=status_key,
            claim=claim_of(request),
            refusal=refusal,
            max_tokens=request.max_tokens,
            count_request=True,
        )
        match reservation.answer:
            case "finished":
                log.info("request %s already has its outcome; dropping the redelivery", request.request_id)
                self.acks.done(message)
                return
            case "done":
                await self._answer_again(message, request, reservation.outcome_event)
                return
            case "conflict":
                await self._answer_publisher(message, request)
                return
            case "refused":
                rejection = reservation.rejection or Rejection("quota_exceeded", "refused by the quota")
                if rejection.reason == "quota_exceeded":
                    metrics.QUOTA_REJECTIONS.labels(model=self._model_label(request.model), stage="worker").inc()
                await self._finish(message, request, decide.refused(request, rejection))
                return
            case "cancel":  # a redelivery of a request cancelled while it ran: never run again
                await self._finish(message, request, decide.cancelled_outcome(request, cause=watch.cause))
                return
        if watch.cancelled:  # the cancel came while the reservation was on its way
            await self._finish(message, request, decide.cancelled_outcome(request, cause=watch.cause))
            return
        reserved = reservation.reserved_tokens or estimate
        start = decide.started(request, reserved_tokens=reserved, worker=self._worker_id, attempt=attempt)
        # Started's confirm is awaited before the outcome is published (so before the ack), not before
        # Triton: the broker round trip overlaps the inference. Unconfirmed, it fails the try like an
        # unconfirmed outcome does (retried in process, then requeued).
        started_confirm = self._publish_started(start) if self._started_after_s <= 0 else None
        try:
            if self.draining.is_set():
                raise Draining  # the reservation stays; the redelivery reuses it (reserve is idempotent)
            result, started_confirm = await self._infer_controlled(request, start, watch, started_confirm)
        except Exception:
            if started_confirm is not None:
                await _settle(started_confirm)
            raise
        except BaseException:
            if started_confirm is not None:
                started_confirm.cancel()
            raise
        outcome = decide.decide_outcome(request, result, started_at=start.occurred_at)
        await self._finish(message, request, outcome, started=started_confirm)

    async def _expire_queued(self, message: RabbitMessage, request: InferenceRequested, expiry: Outcome) -> bool:
        """The deadline passed before the request was taken: end it expired through its claim (atomic with a
        cancel: whichever ends the claim first decides). False: it ended otherwise; the reservation answers."""
        event: decide.Terminal = with_worker_traceparent(expiry.event)
        released = await self._deps.quota.release(
            request.request_id, outcome=encode_event(event), user_id=request.user_id, claim=claim_of(request)
        )
        if released.outcome == "conflict":
            await self._answer_publisher(message, request)
            return True
        if released.outcome != "released":
            return False
        await self._deps.publisher.publish(event)
        record_outcome(event)
        self.acks.done(message)
        _count_outcome(self._model_label(request.model), event, request.occurred_at)
        return True

    async def _handle_cancel(self, message: RabbitMessage, command: CancelRequest) -> None:
        """A bus publisher's cancel of one of its own requests (docs/bus.md): the routing key's user is the
        only one it may cancel for; anything else is acknowledged and left alone."""
        for tries in range(1, TRANSIENT_MAX_TRIES + 1):
            try:
                await self._cancel_for_publisher(command)
                self.acks.done(message)
                return
            except TRANSIENT_ERRORS as exc:
                if self.draining.is_set() or tries == TRANSIENT_MAX_TRIES or _channel_closed(message):
                    log.warning("cancel of %s: %s; requeueing", command.request_id, _describe(exc))
                    await _requeue(message, self._model_label(command.model), self.acks)
                    return
                await asyncio.sleep(TRANSIENT_BACKOFF.delay(tries - 1))
            except Exception:
                log.exception("cancel of %s failed; dropped", command.request_id)
                self.acks.done(message)
                return

    async def _cancel_for_publisher(self, command: CancelRequest) -> None:
        status = self._deps.status
        if status is None:
            log.info("cancel of %s not acted on: this worker reads no status", command.request_id)
            return
        fields = await status.get(command.request_id)
        if fields is not None and fields.get("user_id") != command.user_id:
            log.info("cancel of %s by %s refused: not theirs", command.request_id, command.user_id)
            return
        if control.cancel_verdict(fields.get("status") if fields else "queued") != "attempt":
            return  # cancelled already, or ended otherwise: nothing to do
        event = control.cancelled(
            request_id=command.request_id,
            user_id=command.user_id,
            model=(fields or {}).get("model") or command.model,
            stage="queued",
            cause="bus",
            causation_id=command.event_id,
        )
        result = await self._deps.quota.cancel(
            command.request_id,
            command.user_id,
            outcome=encode_event(event),
            status_key=self._deps.status_keys.status(command.request_id),
            channel=self._deps.status_keys.cancel_channel,
            cause="bus",
        )
        log.info("cancel of %s by its publisher: %s", command.request_id, result.outcome)
        if result.outcome == "queued":
            await self._deps.publisher.publish(event)
            record_outcome(event)

    async def _infer_controlled(
        self,
        request: InferenceRequested,
        start: InferenceStarted,
        watch: Watch,
        started: asyncio.Future[None] | None,
    ) -> tuple[RunOutcome, asyncio.Future[None] | None]:
        """Triton's answer, or Stopped when a cancel or the deadline cancelled the call first; and Started's
        publish (``started``, or made here once the inference outlasted ``started_after_s``)."""
        loop = asyncio.get_running_loop()
        left = control.seconds_left(request.deadline_at, utc_now())
        stop_at = None if left is None else loop.time() + left
        inference = asyncio.ensure_future(self._deps.triton.infer(request))
        watch.task = inference
        try:
            if started is None:
                await asyncio.wait({inference}, timeout=_first(self._started_after_s, _left(stop_at, loop)))
                if not inference.done() and (stop_at is None or loop.time() < stop_at):
                    started = self._publish_started(start)  # occurred_at stays the inference's start
            if not inference.done():
                await asyncio.wait({inference}, timeout=_left(stop_at, loop))
            if not inference.done():  # the deadline: cancel the call (gRPC cancellation reaches Triton)
                inference.cancel()
                await asyncio.wait({inference})
                if not inference.cancelled():  # it answered as it was being cancelled
                    return inference.result(), started
                return Stopped("expired"), started
            if inference.cancelled():  # the cancel channel's listener cancelled it (CancelWatch.notify)
                return Stopped("cancelled", watch.cause), started
            return inference.result(), started
        except Exception:
            if started is not None:
                await _settle(started)
            raise
        except BaseException:
            inference.cancel()
            if started is not None:
                started.cancel()
            raise
        finally:
            watch.task = None

    def _publish_started(self, start: InferenceStarted) -> asyncio.Future[None]:
        return asyncio.ensure_future(self._deps.publisher.publish(with_worker_traceparent(start)))

    async def _finish(
        self,
        message: RabbitMessage,
        request: InferenceRequested,
        outcome: Outcome,
        *,
        started: asyncio.Future[None] | None = None,
    ) -> None:
        """Started confirmed, then quota (idempotent, and it keeps the outcome event with the claim, so a
        crash before the publish is answered on redelivery with this very event), then publish, ack."""
        if started is not None:
            await started
        event: decide.Terminal = with_worker_traceparent(outcome.event)
        match outcome.quota:
            case Commit(tokens=tokens):
                # user_id: charges the right user even if the reservation expired meanwhile;
                # at: the completion's time picks the window, the same day the ledger records.
                at = outcome.event.occurred_at
                await self._deps.quota.commit(
                    request.request_id, tokens, user_id=request.user_id, at=at, outcome=encode_event(event)
                )
            case Release():
                event = await self._release(request, event)
        await self._deps.publisher.publish(event)
        record_outcome(event)
        self.acks.done(message)
        _count_outcome(self._model_label(request.model), event, request.occurred_at)

    async def _release(self, request: InferenceRequested, event: decide.Terminal) -> decide.Terminal:
        """Free the request's hold, keeping ``event`` with its claim; the event to publish: ``event``, or
        the publisher's ``duplicate_request_id`` when the id turned out to be another request's."""
        released = await self._deps.quota.release(
            request.request_id, outcome=encode_event(event), user_id=request.user_id, claim=claim_of(request)
        )
        return duplicate_rejection(request) if released.outcome == "conflict" else event

    async def _answer_again(self, message: RabbitMessage, request: InferenceRequested, kept: bytes | None) -> None:
        """The request already ended: publish the outcome it ended with (same event_id: subscribers and the
        collector see it once), then ack. Never Triton again. Without a kept outcome (a claim rebuilt from the
        ledger, whose outcome the event store holds) there is nothing to publish."""
        event = None
        if kept is not None:
            try:
                event = decode_event(kept)
            except EventDecodeError as exc:
                log.warning("request %s: its kept outcome does not decode (%s)", request.request_id, exc)
        if event is not None:
            await self._deps.publisher.publish(event)
        log.info("request %s already ended; answered with its outcome again, not run", request.request_id)
        self.acks.done(message)
        REDELIVERIES.labels(self._model_label(request.model), "answered_again").inc()

    async def _answer_publisher(self, message: RabbitMessage, request: InferenceRequested) -> None:
        """The request id names another request: refuse this message to its publisher alone, then ack."""
        log.warning("request %s: the id names another request; refused to the publisher", request.request_id)
        rejection = duplicate_rejection(request)
        await self._deps.publisher.publish(rejection)
        self.acks.done(message)
        _count_outcome(self._model_label(request.model), rejection, request.occurred_at)

    async def _dead_letter_invalid(self, message: RabbitMessage, invalid: Invalid, count: int) -> None:
        """Tell the publisher why (when it can be addressed), then reject: the message goes to the DLQ."""
        label = self._model_label(invalid.rejection.model if invalid.rejection else None)
        log.warning("invalid message %s: %s", message.message_id, invalid.detail)
        if invalid.rejection is not None:
            for tries in range(1, TRANSIENT_MAX_TRIES + 1):
                try:
                    await self._deps.publisher.publish(await self._invalid_answer(invalid))
                    metrics.record_outcome("rejected", "invalid_request")
                    break
                except TRANSIENT_ERRORS as exc:
                    if self.draining.is_set() or tries == TRANSIENT_MAX_TRIES or _channel_closed(message):
                        if not decide.is_last_delivery(count):
                            log.warning("rejection of an invalid message not done (%s); requeueing", _describe(exc))
                            await _requeue(message, label, self.acks)
                            return
                        log.warning("rejection of an invalid message not done (%s); dead-lettering", _describe(exc))
                        break
                    await asyncio.sleep(TRANSIENT_BACKOFF.delay(tries - 1))
        await message.reject(requeue=False)
        self.acks.settled(message)
        REDELIVERIES.labels(label, "dead_letter").inc()

    async def _invalid_answer(self, invalid: Invalid) -> InferenceRejected:
        """The invalid message's rejection: on the request it named when the claim lets this message end it
        (it claims the id as refused, or it is a redelivery of the message that did), else to the publisher."""
        assert invalid.rejection is not None
        if invalid.claim is None:
            return invalid.rejection
        claim = invalid.claim
        verdict = await self._deps.quota.refuse(
            claim.request_id,
            claim.user_id,
            claim.claim,
            Rejection("invalid_request", invalid.detail),
            status_key=self._deps.status_keys.status(claim.request_id),
        )
        if verdict.answer == "refused" or invalid.publisher_rejection is None:
            return invalid.rejection
        return invalid.publisher_rejection

    async def _on_unexpected(
        self, message: RabbitMessage, request: InferenceRequested, count: int, exc: Exception
    ) -> None:
        log.exception("request %s: unexpected %s (delivery %d)", request.request_id, type(exc).__name__, count + 1)
        if not decide.is_last_delivery(count):
            await _requeue(message, self._model_label(request.model), self.acks)
            return
        await self._end_on_last_delivery(message, request, decide.delivery_limit_outcome(request, _describe(exc)))

    async def _after_transient(
        self, message: RabbitMessage, request: InferenceRequested, count: int, cause: str
    ) -> None:
        """A try that could not finish for a transient cause: requeued, or on the last delivery ended failed."""
        outcome = decide.transient_outcome(request, count, cause)
        if outcome is None:
            log.warning("request %s: %s; requeueing (delivery %d)", request.request_id, cause, count + 1)
            await _requeue(message, self._model_label(request.model), self.acks)
            return
        log.warning("request %s: %s on its last delivery; it ends failed", request.request_id, cause)
        await self._end_on_last_delivery(message, request, outcome)

    async def _end_on_last_delivery(
        self, message: RabbitMessage, request: InferenceRequested, outcome: Outcome
    ) -> None:
        """The request's failure on its last delivery, charged correctly, then the dead-letter.

        The release answers whether the request may end so (decide.last_delivery_action): a committed request
        (its result was recorded and charged) or one that ended before keeps its outcome and gets no second
        one; ``mlp dlq replay`` re-drives it and the worker answers with the kept outcome, never Triton again.
        """
        label = self._model_label(request.model)
        event: decide.Terminal = with_worker_traceparent(outcome.event)
        try:
            released = await self._deps.quota.release(
                request.request_id, outcome=encode_event(event), user_id=request.user_id, claim=claim_of(request)
            )
            match decide.last_delivery_action(released.outcome):
                case "publish":
                    await self._deps.publisher.publish(event)
                    record_outcome(event)
                    _count_outcome(label, event, request.occurred_at)
                case "answer_publisher":
                    rejection = duplicate_rejection(request)
                    await self._deps.publisher.publish(rejection)
                    _count_outcome(label, rejection, request.occurred_at)
                case "dead_letter":
                    log.warning(
                        "request %s had already ended (%s); dead-lettered, `mlp dlq replay` answers it again",
                        request.request_id,
                        released.outcome,
                    )
        except Exception:
            # Not even the failure could be recorded (Redis or the broker down): the broker dead-letters the
            # message on this return, never silently; `mlp dlq replay` re-drives it once the cause is fixed.
            log.exception("request %s: its failure could not be recorded; left to the DLQ", request.request_id)
            await _requeue(message, label, self.acks)
            REDELIVERIES.labels(label, "dead_letter").inc()
            return
        try:
            await message.reject(requeue=False)
        except Exception as exc:  # channel gone: the broker returns it, past its limit, to the DLQ itself
            log.warning("reject of %s failed (%s); the broker dead-letters it", message.message_id, _describe(exc))
        self.acks.settled(message)
        REDELIVERIES.labels(label, "dead_letter").inc()

    def _count(self, request: InferenceRequested) -> int | None:
        if self._prompt_tokens is None or len(request.prompt) > self._limits.max_prompt_chars:
            return None
        return self._prompt_tokens.count(request.model, request.prompt)

    def _model_label(self, model: str | None) -> str:
        # Label values come from the bus: only served models, never arbitrary strings.
        return model if model is not None and model in self._limits.models else "other"


def _delivery(message: RabbitMessage) -> Delivery:
    raw = message.raw_message
    return Delivery(
        body=message.body,
        routing_key=raw.routing_key or "",
        correlation_id=raw.correlation_id,
        message_id=raw.message_id,
        headers=dict(raw.headers or {}),
    )


async def _requeue(message: RabbitMessage, model: str, acks: BulkAcker) -> None:
    try:
        await message.nack(requeue=True)
    except Exception as exc:  # channel gone: the broker requeues unacked messages itself
        log.warning("nack of %s failed (%s); the broker requeues it", message.message_id, _describe(exc))
    acks.settled(message)
    REDELIVERIES.labels(model, "requeue").inc()


async def _settle(publish: asyncio.Future[None]) -> None:
    """Wait out a publish whose result no longer matters (its delivery is requeued or failed anyway)."""
    try:
        await publish
    except Exception as exc:
        log.debug("publish settled with %s", _describe(exc))


def _left(stop_at: float | None, loop: asyncio.AbstractEventLoop) -> float | None:
    return None if stop_at is None else max(0.0, stop_at - loop.time())


def _first(a: float, b: float | None) -> float:
    return a if b is None else min(a, b)


def _channel_closed(message: RabbitMessage) -> bool:
    channel = getattr(message.raw_message, "channel", None)
    return bool(getattr(channel, "is_closed", False))


def _describe(exc: BaseException) -> str:
    return decide.truncate(f"{type(exc).__name__}: {exc}")


def _count_outcome(model: str, event: decide.Terminal, submitted_at: datetime) -> None:
    metrics.record_request_duration(model, status_of(event), submitted_at, event.occurred_at)
    match event:
        case InferenceCompleted():
            metrics.record_outcome("completed")
            metrics.record_tokens(model, event.prompt_tokens, event.completion_tokens)
            metrics.INFERENCE_LATENCY.labels(model=model).observe(event.latency_ms / 1000)
        case InferenceFailed():
            metrics.record_outcome("failed", event.error_code)
        case InferenceRejected():
            metrics.record_outcome("rejected", event.reason)
        case InferenceCancelled():
            metrics.record_outcome("cancelled", event.stage)
        case InferenceExpired():
            metrics.record_outcome("expired", event.stage)

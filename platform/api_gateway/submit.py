"""Accepting a request: admission, idempotency, the confirmed publish, the first status.

A request is accepted only once the broker confirmed the InferenceRequested event; anything
less is an error the client sees (503), and nothing is left half-accepted. Once the broker
confirmed it, the request IS accepted: the client gets its 202 whatever fails afterwards.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from api_gateway.idempotency import PENDING, IdempotencyRecords, pending_ttl_for
from events import control
from events.identity import claim_of, rejection_of
from events.model import InferenceRejected, InferenceRequested, new_event_id, utc_now
from events.request_rules import Rejection, RequestLimits, check_request
from mlp.bus import EventPublisher, PublishError, PublishRefused
from mlp.cache import Keys
from mlp.settings import Settings
from projections.status_cache import StatusCache
from quota.plans import reservation_estimate
from quota.service import Admission, QuotaService

log = logging.getLogger(__name__)


def queue_full_rejection(refused: InferenceRequested) -> InferenceRejected:
    """The outcome of a request the broker refused (its queue full): ``queue_full`` on its own stream."""
    detail = "the model's request queue was full; the submit was answered 503 and not accepted"
    return rejection_of(refused, "queue_full", detail)


class SubmitError(Exception):
    """Base of the gateway's refusals; the HTTP layer maps each to a status code."""


class RequestRefused(SubmitError):
    """The request breaks a request rule (events.request_rules): a client error."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.message)
        self.rejection = rejection


class QuotaExceeded(SubmitError):
    def __init__(self, admission: Admission) -> None:
        super().__init__(admission.detail)
        self.admission = admission


class BrokerUnavailable(SubmitError):
    pass


class QueueFull(SubmitError):
    """The broker refused the request: the model's request queue is at its bound (MLP_MAX_QUEUED_PER_MODEL)."""

    def __init__(self, model: str, detail: str) -> None:
        super().__init__(detail)
        self.model = model


class IdempotencyConflict(SubmitError):
    """The same Idempotency-Key is being submitted concurrently; the client should retry shortly."""


class StateUnavailable(SubmitError):
    """Redis (idempotency keys, the first status entry) cannot answer now: nothing was accepted."""


class TargetUnavailable(SubmitError):
    """The request's one-off webhook target could not be recorded (Postgres): nothing was accepted."""


@dataclass(frozen=True, slots=True)
class SubmitSettings:
    """The settings a submit uses (built from the platform's ``Settings`` by the gateway's composition root)."""

    redis_prefix: str
    limits: RequestLimits  # the request rules' bounds (events.request_rules)
    publish_timeout_s: float  # bounds how long an idempotency key may stay pending

    @classmethod
    def of(cls, settings: Settings) -> SubmitSettings:
        return cls(settings.redis_prefix, settings.request_limits(), settings.publish_timeout_s)


class OneOffTargets(Protocol):
    """Records a request's one-off webhook target before it is published (``webhooks.store.PostgresTargets``)."""

    async def remember(self, request_id: str, user_id: str, url: str) -> None: ...

    async def forget(self, request_id: str) -> None: ...


class PromptTokens(Protocol):
    """Counts a prompt with its model's tokenizer (``ml_service.tokens.TokenCounter``)."""

    def count(self, model: str, prompt: str) -> int | None: ...


@dataclass(frozen=True)
class Accepted:
    request_id: str
    replayed: bool  # True when an Idempotency-Key returned an earlier request


class SubmitService:
    def __init__(
        self,
        settings: SubmitSettings,
        publisher: EventPublisher,
        quota: QuotaService,
        redis_client: redis.Redis,
        status_cache: StatusCache,
        tokens: PromptTokens | None = None,
        idempotency: IdempotencyRecords | None = None,
        targets: OneOffTargets | None = None,
    ) -> None:
        self._publisher = publisher
        self._targets = targets
        # None: no model's input is limited in tokens here (only in characters).
        self._tokens = tokens
        self._quota = quota
        self._redis = redis_client
        self._status_cache = status_cache
        self._keys = Keys(settings.redis_prefix)
        self._limits = settings.limits
        self._idempotency = idempotency or IdempotencyRecords(
            redis_client, self._keys, pending_ttl_s=pending_ttl_for(settings.publish_timeout_s)
        )

    async def submit(
        self,
        *,
        user_id: str,
        model: str,
        prompt: str,
        max_tokens: int | None,
        idempotency_key: str | None,
        trace_id: str | None,
        traceparent: str | None,
        timeout_s: float | None = None,
        webhook_url: str | None = None,
    ) -> Accepted:
        """``webhook_url``: already checked by the caller (the SSRF guard); recorded before the publish."""
        tokens = self._limits.effective_max_tokens(max_tokens, model)
        rejection = check_request(
            model=model, prompt=prompt, max_tokens=tokens, limits=self._limits, prompt_tokens=self._count(model, prompt)
        )
        if rejection is not None:
            raise RequestRefused(rejection)
        # The plan bounds the deadline and may give one by default (events.control).
        limits = await self._quota.limits_for(user_id)
        if timeout_s is not None and (late := control.check_timeout(timeout_s, limits.max_timeout_s, limits.plan)):
            raise RequestRefused(late)
        default_timeout_s = limits.default_timeout_s
        try:
            return await self._submit(
                user_id=user_id,
                model=model,
                prompt=prompt,
                tokens=tokens,
                idempotency_key=idempotency_key,
                trace_id=trace_id,
                traceparent=traceparent,
                timeout_s=timeout_s,
                default_timeout_s=default_timeout_s,
                webhook_url=webhook_url,
            )
        except RedisError as exc:  # the admission translates its own (QuotaUnavailable); these are ours
            raise StateUnavailable(f"redis: {type(exc).__name__}: {exc}") from exc

    async def _remember_target(self, request_id: str, user_id: str, url: str) -> None:
        # Before the publish: the dispatcher finds the target once the request's outcome exists. A failure
        # refuses the request (503) as a failed publish does, the status entry removed again.
        try:
            if self._targets is None:
                raise RuntimeError("this gateway records no webhook targets")
            await self._targets.remember(request_id, user_id, url)
        except Exception as exc:
            await self._status_cache.forget(request_id)
            raise TargetUnavailable(f"{type(exc).__name__}: {exc}") from exc

    async def _forget_target(self, request_id: str) -> None:
        # A request that was not accepted calls no webhook (its queue_full rejection, say); best effort.
        if self._targets is None:
            return
        try:
            await self._targets.forget(request_id)
        except Exception as exc:
            log.warning("request %s: not accepted, its webhook target not removed: %r", request_id, exc)

    async def _withdraw(self, refused: InferenceRequested) -> None:
        """End a refused request where it still arrived: a nack from the full requests queue does not undo the
        copy the projections queue took, so the read model would keep it queued forever. Its rejection
        (``queue_full``) reaches only the projections (and subscribers); best effort: a failure leaves a stream
        without an outcome, which ``mlp reconcile`` reports."""
        try:
            await self._publisher.publish(queue_full_rejection(refused))
        except PublishError as exc:
            log.warning("request %s: refused (queue full), its rejection not published: %s", refused.request_id, exc)

    def _count(self, model: str, prompt: str) -> int | None:
        # Only a model with an input limit in tokens is counted, and only a prompt within the character limit.
        if self._tokens is None or len(prompt) > self._limits.max_prompt_chars:
            return None
        return self._tokens.count(model, prompt)

    async def _submit(
        self,
        *,
        user_id: str,
        model: str,
        prompt: str,
        tokens: int,
        idempotency_key: str | None,
        trace_id: str | None,
        traceparent: str | None,
        timeout_s: float | None,
        default_timeout_s: int | None,
        webhook_url: str | None,
    ) -> Accepted:
        request_id = new_event_id()
        if idempotency_key is not None:
            # Claim the key first: a retried submit returns the first request instead of running twice.
            existing = await self._idempotency.claim(user_id, idempotency_key)
            if existing == PENDING:
                raise IdempotencyConflict("a submit with this Idempotency-Key is in progress")
            if existing is not None:
                return Accepted(request_id=existing, replayed=True)
        try:
            accepted_at = utc_now()
            event = InferenceRequested(
                event_id=new_event_id(),
                request_id=request_id,
                occurred_at=accepted_at,
                correlation_id=request_id,
                traceparent=traceparent,
                trace_id=trace_id,
                user_id=user_id,
                model=model,
                prompt=prompt,
                max_tokens=tokens,
                source="http",
                deadline_at=control.deadline_for(accepted_at, timeout_s, default_timeout_s),
                webhook_url=webhook_url,
            )
            # Status first: a GET right after the 202 must find the request. The admission writes it
            # (only when it admits) in its own Redis round trip, and claims the request id for the user
            # before it is published (docs/bus.md, "Request identity"); if the publish then fails, the
            # entry is removed again before the client hears 503 (the claim just expires: the id is never reused).
            queued = self._status_cache.queued(event)
            admission = await self._quota.admit(
                user_id,
                tokens,
                reservation_estimate(prompt, tokens, self._limits.specs.get(model)),
                queued=queued,
                request_id=request_id,
                claim=claim_of(event),
            )
            if not admission.allowed:
                raise QuotaExceeded(admission)
            if webhook_url is not None:
                await self._remember_target(request_id, user_id, webhook_url)
            try:
                await self._publisher.publish(event)
            except PublishRefused as exc:
                await self._status_cache.forget(request_id)
                if webhook_url is not None:
                    await self._forget_target(request_id)  # before the rejection exists
                await self._withdraw(event)
                raise QueueFull(model, str(exc)) from exc
            except PublishError as exc:
                await self._status_cache.forget(request_id)
                if webhook_url is not None:
                    await self._forget_target(request_id)
                raise BrokerUnavailable(str(exc)) from exc
        except BaseException:
            if idempotency_key is not None:
                await self._idempotency.release(user_id, idempotency_key)
            raise
        # Confirmed: the request is queued. A Redis failure from here on must not turn it into a 503.
        if idempotency_key is not None:
            await self._idempotency.record(user_id, idempotency_key, request_id)
        return Accepted(request_id=request_id, replayed=False)

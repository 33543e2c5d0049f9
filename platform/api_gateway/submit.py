"""Accepting a request: admission, idempotency, the confirmed publish, the first status.

A request is accepted only once the broker confirmed the InferenceRequested event; anything
less is an error the client sees (503), and nothing is left half-accepted. Once the broker
confirmed it, the request IS accepted: the client gets its 202 whatever fails afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as redis

from api_gateway.idempotency import PENDING, IdempotencyRecords, pending_ttl_for
from events.model import InferenceRequested, new_event_id, utc_now
from mlp.bus import EventPublisher, PublishError
from mlp.cache import Keys
from mlp.settings import Settings
from projections.status_cache import STATUS_TTL_S, cache_update
from quota.ledger import QueuedStatus
from quota.plans import reservation_estimate
from quota.service import Admission, QuotaService


class SubmitError(Exception):
    """Base of the gateway's refusals; the HTTP layer maps each to a status code."""


class UnknownModel(SubmitError):
    pass


class InputTooLarge(SubmitError):
    def __init__(self, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.reason = reason  # prompt_too_large | max_tokens_too_large (a metrics label)


class QuotaExceeded(SubmitError):
    def __init__(self, admission: Admission) -> None:
        super().__init__(admission.detail)
        self.admission = admission


class BrokerUnavailable(SubmitError):
    pass


class IdempotencyConflict(SubmitError):
    """The same Idempotency-Key is being submitted concurrently; the client should retry shortly."""


@dataclass(frozen=True)
class Accepted:
    request_id: str
    replayed: bool  # True when an Idempotency-Key returned an earlier request


class SubmitService:
    def __init__(
        self,
        settings: Settings,
        publisher: EventPublisher,
        quota: QuotaService,
        redis_client: redis.Redis,
        idempotency: IdempotencyRecords | None = None,
    ) -> None:
        self._settings = settings
        self._publisher = publisher
        self._quota = quota
        self._redis = redis_client
        self._keys = Keys(settings.redis_prefix)
        self._idempotency = idempotency or IdempotencyRecords(
            redis_client, self._keys, pending_ttl_s=pending_ttl_for(settings.publish_timeout_s)
        )

    def validate(self, prompt: str, model: str, max_tokens: int | None) -> int:
        """Checks the configured limits; returns the effective max_tokens."""
        if model not in self._settings.models:
            served = ", ".join(self._settings.models)
            raise UnknownModel(f"unknown model {model!r}; this platform serves: {served}")
        if len(prompt) > self._settings.max_prompt_chars:
            limit = self._settings.max_prompt_chars
            raise InputTooLarge(f"prompt has {len(prompt)} characters; the limit is {limit}", "prompt_too_large")
        tokens = max_tokens if max_tokens is not None else self._settings.default_max_tokens
        if tokens > self._settings.max_tokens_limit:
            detail = f"max_tokens is {tokens}; the limit is {self._settings.max_tokens_limit}"
            raise InputTooLarge(detail, "max_tokens_too_large")
        return tokens

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
    ) -> Accepted:
        tokens = self.validate(prompt, model, max_tokens)
        request_id = new_event_id()
        if idempotency_key is not None:
            # Claim the key first: a retried submit returns the first request instead of running twice.
            existing = await self._idempotency.claim(user_id, idempotency_key)
            if existing == PENDING:
                raise IdempotencyConflict("a submit with this Idempotency-Key is in progress")
            if existing is not None:
                return Accepted(request_id=existing, replayed=True)
        try:
            event = InferenceRequested(
                event_id=new_event_id(),
                request_id=request_id,
                occurred_at=utc_now(),
                correlation_id=request_id,
                traceparent=traceparent,
                trace_id=trace_id,
                user_id=user_id,
                model=model,
                prompt=prompt,
                max_tokens=tokens,
                source="http",
            )
            # Status first: a GET right after the 202 must find the request. The admission writes it
            # (only when it admits) in its own Redis round trip; if the publish then fails, the entry
            # is removed again before the client hears 503.
            queued = QueuedStatus(self._keys.status(request_id), STATUS_TTL_S, _queued_fields(event))
            admission = await self._quota.admit(user_id, tokens, reservation_estimate(prompt, tokens), queued=queued)
            if not admission.allowed:
                raise QuotaExceeded(admission)
            try:
                await self._publisher.publish(event)
            except PublishError as exc:
                await self._forget(request_id)
                raise BrokerUnavailable(str(exc)) from exc
        except BaseException:
            if idempotency_key is not None:
                await self._idempotency.release(user_id, idempotency_key)
            raise
        # Confirmed: the request is queued. A Redis failure from here on must not turn it into a 503.
        if idempotency_key is not None:
            await self._idempotency.record(user_id, idempotency_key, request_id)
        return Accepted(request_id=request_id, replayed=False)

    async def _forget(self, request_id: str) -> None:
        await self._redis.delete(self._keys.status(request_id))


def _queued_fields(event: InferenceRequested) -> list[str]:
    """The queued entry's field/value pairs, flat: the status cache's own projection of the event."""
    _, _, fields = cache_update(event)
    return [part for pair in fields.items() for part in pair]

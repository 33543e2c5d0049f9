"""Cancelling a request: ``POST /api/v1/inference/{request_id}/cancel`` (events.control has the rules).

The request's view (the status cache, else Postgres) says whose it is and whether it can still be
cancelled; the cancel itself is quota.scripts.CANCEL, atomic with the worker's reservation:

- won while queued: this gateway publishes the ``InferenceCancelled`` (confirmed) that the claim now
  keeps; the worker that later takes the message answers it with that very event and never runs it;
- running: the request's worker is told on the cancel channel and ends it ``cancelled`` itself;
- cancelled before: answered again (idempotent), its kept event republished (same event_id: stored once),
  so a cancel whose publish failed is completed by its retry;
- any other terminal state: ``not_cancellable`` (409).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal, Protocol

import asyncpg

from events import control
from events.model import Event, EventDecodeError, decode_event, encode_event
from mlp.bus import PublishError
from projections.queries import RequestView, get_request
from projections.status_cache import StatusCache, StatusCacheUnavailable, StatusKeys, cache_update
from quota.ledger import CancelResult
from tenancy.caller import Caller

log = logging.getLogger(__name__)

# accepted: 202 with ``view``; unknown: 404; not_cancellable: 409 (``view`` says how it ended).
CancelAnswer = Literal["accepted", "unknown", "not_cancellable"]


@dataclass(frozen=True)
class Cancelled:
    answer: CancelAnswer
    view: RequestView | None = None


class CancelUnavailable(Exception):
    """The cancel could not be recorded or its event not confirmed now: the client retries (idempotent)."""


class Publisher(Protocol):
    async def publish(self, event: Event, headers: dict[str, object] | None = None) -> None: ...


class Canceller(Protocol):
    async def cancel(
        self, request_id: str, user_id: str, *, outcome: bytes, status_key: str, channel: str
    ) -> CancelResult: ...


class CancelService:
    def __init__(
        self, publisher: Publisher, quota: Canceller, status_cache: StatusCache, keys: StatusKeys, pool: asyncpg.Pool
    ) -> None:
        self._publisher = publisher
        self._quota = quota
        self._status_cache = status_cache
        self._keys = keys
        self._pool = pool

    async def cancel(self, request_id: str, caller: Caller, *, traceparent: str | None = None) -> Cancelled:
        view = await self._view(request_id)
        if view is None or view.user_id is None or view.model is None or not caller.may_see_user(view.user_id):
            return Cancelled("unknown")  # another user's request is answered as an unknown one
        match control.cancel_verdict(view.status):
            case "already":
                return Cancelled("accepted", view)
            case "not_cancellable":
                return Cancelled("not_cancellable", view)
        event = control.cancelled(
            request_id=request_id,
            user_id=view.user_id,
            model=view.model,
            stage="queued",
            cause="http",
            traceparent=traceparent,
        )
        result = await self._quota.cancel(
            request_id,
            view.user_id,
            outcome=encode_event(event),
            status_key=self._keys.status(request_id),
            channel=self._keys.cancel_channel,
        )
        match result.outcome:
            case "queued":
                await self._publish(event)
            case "cancelled":
                kept = _decoded(result.kept)
                if kept is not None:
                    await self._publish(kept)
            case "running":
                return Cancelled("accepted", view)
            case "ended":
                return Cancelled("not_cancellable", await self._view(request_id) or view)
            case "unknown":
                return Cancelled("unknown")
        return Cancelled("accepted", await self._view(request_id) or view)

    async def _publish(self, event: Event) -> None:
        try:
            await self._publisher.publish(event)
        except PublishError as exc:
            raise CancelUnavailable(str(exc)) from exc
        try:  # the cancel shows at once (the collector's own write comes later and changes nothing)
            request_id, status, fields = cache_update(event)
            await self._status_cache.advance(request_id, status, fields)
        except Exception as exc:  # the collector writes it anyway
            log.warning("status cache not updated for the cancel of %s: %s", event.request_id, exc)

    async def _view(self, request_id: str) -> RequestView | None:
        try:
            cached = await self._status_cache.get(request_id)
        except StatusCacheUnavailable:
            cached = None
        if cached is not None:
            return RequestView.from_cache(request_id, cached)
        return await get_request(self._pool, request_id)


def _decoded(kept: bytes | None) -> Event | None:
    if kept is None:
        return None
    try:
        return decode_event(kept)
    except EventDecodeError as exc:
        log.warning("a kept InferenceCancelled does not decode: %s", exc)
        return None

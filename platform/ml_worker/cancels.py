"""How a worker learns that a request it is running was cancelled: one Redis pub/sub channel.

quota.scripts.CANCEL marks a reserved request's claim and publishes ``"<cause> <request_id>"`` on
``StatusKeys.cancel_channel``; every worker is subscribed, and the one whose ``CancelWatch`` holds the
request cancels its Triton call (cancelling the asyncio task cancels the gRPC call). A request is
watched from before its reservation, so a cancel that lands between the reservation and the Triton
call is not missed. Pub/sub is at most once: a notification lost while the subscription reconnects
leaves that request running to its end (it then ends as Triton answers); a redelivery of a marked
request is never run again (RESERVE answers CANCELLING).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Final, cast

import redis.asyncio as redis

from events.model import CancelCause
from mlp.cache import Subscription

log = logging.getLogger(__name__)

_CAUSES: Final = frozenset({"http", "bus"})


@dataclass
class Watch:
    """One request in this worker: whether a cancel was asked for, and the Triton call to cancel."""

    request_id: str
    cancelled: bool = False
    cause: CancelCause = "http"
    task: asyncio.Future[Any] | None = field(default=None, repr=False)


def parse_notice(data: str) -> tuple[CancelCause, str] | None:
    """``"<cause> <request_id>"`` -> (cause, request_id); None for anything else. Pure."""
    cause, _, request_id = data.partition(" ")
    if cause not in _CAUSES or not request_id:
        return None
    return cast(CancelCause, cause), request_id


class CancelWatch:
    def __init__(self) -> None:
        self._watches: dict[str, Watch] = {}

    @contextlib.contextmanager
    def watching(self, request_id: str) -> Iterator[Watch]:
        watch = Watch(request_id)
        self._watches[request_id] = watch
        try:
            yield watch
        finally:
            if self._watches.get(request_id) is watch:
                del self._watches[request_id]

    def notify(self, request_id: str, cause: CancelCause) -> bool:
        """A cancel of ``request_id`` was asked for: True when this worker holds it (its call is cancelled)."""
        watch = self._watches.get(request_id)
        if watch is None:
            return False
        watch.cancelled = True
        watch.cause = cause
        if watch.task is not None and not watch.task.done():
            watch.task.cancel()
        log.info("request %s: cancel asked for (%s); cancelling its Triton call", request_id, cause)
        return True


class CancelListener:
    """The subscription (started and closed by the worker's resources)."""

    def __init__(self, client: redis.Redis, channel: str, watch: CancelWatch) -> None:
        self._watch = watch
        self._subscription = Subscription(client, channel, self._on_notice, name="cancel-listener")
        self.subscribed = self._subscription.subscribed

    def start(self) -> None:
        self._subscription.start()

    async def close(self) -> None:
        await self._subscription.close()

    def _on_notice(self, data: str) -> None:
        notice = parse_notice(data)
        if notice is not None:
            self._watch.notify(notice[1], notice[0])

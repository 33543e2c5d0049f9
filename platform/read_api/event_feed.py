"""The live feed of the SSE streams: one Postgres LISTEN per read API process, many streams.

Migration 0011's trigger sends ``NOTIFY mlp_event_store, '<request_id>'`` for every event newly stored,
at the commit of the collector's transaction. One connection of this process listens; each open stream
waits on an ``asyncio.Event`` of its request (a few hundred bytes, no connection of its own), which a
notification sets. The stream then re-reads the event store, the truth: a notification only says "look
again". Notifications are best effort (none arrive while the connection is down), so a stream also
re-reads on a slow timer, and every stream is woken when the connection is (re)established: a missed
notification only delays, it never loses an event. Nothing here is state of record: any replica can
serve any stream, and a resumed one starts from what the store holds.

The feed connects with ``MLP_POSTGRES_DSN`` directly (a LISTEN needs a session of its own: not through
a transaction-mode pooler).

Each caller holds at most ``max_per_caller`` streams open at once on this process (``lease``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from mlp.db import Connect, listen_connector, listen_forever
from projections.event_log import EVENT_STORE_CHANNEL

log = logging.getLogger(__name__)


class TooManyStreams(Exception):
    """The caller already holds as many streams as it may."""


class StreamLease:
    """One of a caller's stream places; ``release`` is idempotent (a stream may end along several paths)."""

    def __init__(self, held: defaultdict[str, int], caller_key: str) -> None:
        self._held = held
        self._key = caller_key
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._held[self._key] -= 1
        if self._held[self._key] <= 0:
            del self._held[self._key]


class EventFeed:
    def __init__(self, connect: Connect, max_per_caller: int = 16) -> None:
        self._connect = connect
        self._max_per_caller = max_per_caller
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._held: defaultdict[str, int] = defaultdict(int)
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self.stopping = False  # the process is shutting down: every stream ends (clients resume elsewhere)
        self.listening = asyncio.Event()  # set while the LISTEN is in place (tests wait on it)

    @classmethod
    def for_dsn(cls, dsn: str, max_per_caller: int = 16) -> EventFeed:
        return cls(listen_connector(dsn), max_per_caller)

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.create_task(self._listen(), name="event-feed")

    def stop_streams(self) -> None:
        """End every open stream at its next wake-up, which this causes at once. Safe in a signal handler
        (the server's graceful shutdown calls it: ``mlp.http``), so streams do not hold the shutdown up."""
        if self._loop is None or self._loop.is_closed():
            return
        self._loop.call_soon_threadsafe(self._stop_streams)

    def _stop_streams(self) -> None:
        self.stopping = True
        self._wake_all()

    async def close(self) -> None:
        self._closing = True
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 5.0)

    def open_streams(self) -> int:
        return sum(self._held.values())

    def lease(self, caller_key: str) -> StreamLease:
        """One of the caller's stream places (release it when the stream ends); TooManyStreams when none is free."""
        if self._held.get(caller_key, 0) >= self._max_per_caller:
            raise TooManyStreams(caller_key)
        self._held[caller_key] += 1
        return StreamLease(self._held, caller_key)

    @contextlib.contextmanager
    def watching(self, request_id: str) -> Iterator[asyncio.Event]:
        """An event set when ``request_id`` may have new events. Register BEFORE the read that decides to wait."""
        event = asyncio.Event()
        self._waiters[request_id].add(event)
        try:
            yield event
        finally:
            waiters = self._waiters.get(request_id)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._waiters[request_id]

    def _notified(self, _conn: Any, _pid: int, _channel: str, request_id: object) -> None:
        for event in self._waiters.get(str(request_id), ()):
            event.set()

    def _wake_all(self) -> None:
        for waiters in self._waiters.values():
            for event in waiters:
                event.set()

    async def _listen(self) -> None:
        await listen_forever(
            self._connect,
            EVENT_STORE_CHANNEL,
            self._notified,
            listening=self.listening,
            on_listening=self._wake_all,
            closing=lambda: self._closing,
            what="event store notifications",
        )

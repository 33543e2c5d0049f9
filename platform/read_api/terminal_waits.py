"""Long-poll wake-ups: one Redis subscription per read API process, many waiting requests.

The status cache publishes a request's status key on ``StatusCache.terminal_channel`` the moment it
becomes terminal; waiters of that request are woken at once instead of polling on a timer.
Pub/sub is best effort (a message sent while the subscription reconnects is lost), so a waiter
also re-reads on a slow timer: the notification is for speed, the re-read for certainty.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator

import redis.asyncio as redis

from projections.status_cache import StatusCache

log = logging.getLogger(__name__)
_CLOSE_WAIT_S = 2.0


class TerminalWaits:
    def __init__(self, redis_client: redis.Redis, cache: StatusCache) -> None:
        self._redis = redis_client
        self._cache = cache
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="terminal-waits")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            # Bounded: cancelled while its subscription is still being set up, redis-py's listen() can
            # swallow the cancellation and never return (the read API then never finished stopping).
            # Closing the Redis client afterwards ends the connection it waits on.
            await asyncio.wait({self._task}, timeout=_CLOSE_WAIT_S)

    @contextlib.contextmanager
    def watching(self, request_id: str) -> Iterator[asyncio.Event]:
        """An event set when ``request_id`` turns terminal. Register BEFORE the re-read that decides to wait."""
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

    async def _listen(self) -> None:
        while True:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._cache.terminal_channel)
                    async for message in pubsub.listen():
                        if message.get("type") != "message":
                            continue
                        for event in self._waiters.get(self._cache.request_id_of(str(message["data"])), ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: waiters fall back to their timer meanwhile
                log.warning("terminal-state subscription lost (%r); resubscribing", exc)
                await asyncio.sleep(1.0)

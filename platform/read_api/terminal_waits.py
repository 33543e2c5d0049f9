"""Long-poll wake-ups and limits: one Redis subscription per read API process, many waiting requests.

The status cache publishes a request's status key on ``StatusCache.terminal_channel`` the moment it
becomes terminal; waiters of that request are woken at once instead of polling on a timer.
Pub/sub is best effort (a message sent while the subscription reconnects is lost), so a waiter
also re-reads on a slow timer: the notification is for speed, the re-read for certainty.

Each caller holds at most ``max_per_caller`` waits open at once on this process (``slot``): a long-poll
holds a request open for up to ``MLP_MAX_WAIT_S``, and one client must not hold them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Iterator
from typing import Final

import redis.asyncio as redis

from projections.status_cache import StatusCache
from tenancy.caller import Caller

log = logging.getLogger(__name__)

# How long one read of the subscription waits for a message: also how soon ``close`` is noticed.
_LISTEN_POLL_S: Final = 1.0


class TooManyWaits(Exception):
    """The caller already holds as many long-polls as it may."""


def wait_key(caller: Caller, client_host: str | None) -> str:
    """Whose wait this is, for the per-caller limit: the user, else the key, else (open mode) the client
    address. Pure."""
    if caller.user_id is not None:
        return f"user:{caller.user_id}"
    if caller.key_id is not None:
        return f"key:{caller.key_id}"
    return f"addr:{client_host or 'unknown'}"


class TerminalWaits:
    def __init__(self, redis_client: redis.Redis, cache: StatusCache, max_per_caller: int = 32) -> None:
        self._redis = redis_client
        self._cache = cache
        self._max_per_caller = max_per_caller
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._held: defaultdict[str, int] = defaultdict(int)
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="terminal-waits")

    async def close(self) -> None:
        """Stop listening. The loop notices within ``_LISTEN_POLL_S``; cancelling it is the fallback only,
        since a cancellation that lands inside redis-py's pub/sub read can be swallowed there."""
        self._closing = True
        if self._task is None:
            return
        try:
            await asyncio.wait_for(asyncio.shield(self._task), _LISTEN_POLL_S + 2.0)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(self._task, 2.0)

    def held(self, caller_key: str) -> int:
        """How many long-poll slots ``caller_key`` holds now."""
        return self._held.get(caller_key, 0)

    @contextlib.contextmanager
    def slot(self, caller_key: str) -> Iterator[None]:
        """One of the caller's long-poll slots for the duration of the block; TooManyWaits when none is free."""
        if self._held[caller_key] >= self._max_per_caller:
            raise TooManyWaits(caller_key)
        self._held[caller_key] += 1
        try:
            yield
        finally:
            self._held[caller_key] -= 1
            if self._held[caller_key] <= 0:
                del self._held[caller_key]

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
        while not self._closing:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(self._cache.terminal_channel)
                    while not self._closing:
                        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=_LISTEN_POLL_S)
                        if message is None or message.get("type") != "message":
                            continue
                        for event in self._waiters.get(self._cache.request_id_of(str(message["data"])), ()):
                            event.set()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis restarting: waiters fall back to their timer meanwhile
                if self._closing:
                    return
                log.warning("terminal-state subscription lost (%r); resubscribing", exc)
                await asyncio.sleep(1.0)

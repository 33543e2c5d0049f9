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

import redis.asyncio as redis

from mlp.cache import Subscription
from projections.status_cache import StatusCache
from tenancy.caller import Caller

log = logging.getLogger(__name__)


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
        self._cache = cache
        self._max_per_caller = max_per_caller
        self._waiters: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._held: defaultdict[str, int] = defaultdict(int)
        self._subscription = Subscription(
            redis_client, cache.terminal_channel, self._on_terminal, name="terminal-waits"
        )

    def start(self) -> None:
        self._subscription.start()

    async def close(self) -> None:
        """Stop listening (mlp.cache.Subscription.close)."""
        await self._subscription.close()

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

    def _on_terminal(self, data: str) -> None:
        for event in self._waiters.get(self._cache.request_id_of(data), ()):
            event.set()

"""The per-user bindings of ``mlp.webhooks``: only the outcomes of users with a webhook reach the queue.

The dispatcher alone binds its queue (its RabbitMQ user may; the others' may not). It keeps the bindings in
step with the ``webhooks`` table, the truth:
- at start, before it consumes: every user with a webhook is bound (idempotent), every recorded binding of a
  user without one is removed;
- on ``NOTIFY mlp_webhooks_changed '<user_id>'`` (sent by the gateway's create and delete, in their
  transaction), on one listening connection: that user's binding is brought in step;
- every ``MLP_WEBHOOK_RESYNC_S``, a full resync: the backstop for a notification missed while the listening
  connection was down.

``webhook_bindings`` records the users bound (the row is written after the bind and removed after the unbind),
so a restarted dispatcher or another replica knows what to unbind. An outcome published after the webhook's
creation but before the binding went past the queue: after each bind, and on every resync, the outcomes of
that window are enqueued from the event store (``webhooks.store.catch_up``), so nothing is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from events.topology import webhook_binding_keys
from mlp.db import LISTEN_RECONNECT_S, Connect, listen_forever
from webhook_dispatcher import metrics
from webhooks import store

log = logging.getLogger(__name__)

Bind = Callable[[tuple[str, ...], bool], Awaitable[None]]  # (keys, True: bind / False: unbind)
Wake = Callable[[], None]


class Bindings:
    def __init__(self, pool: asyncpg.Pool, bind: Bind, connect: Connect, *, resync_s: float, on_enqueued: Wake) -> None:
        self._pool = pool
        self._bind = bind
        self._connect = connect
        self._resync_s = resync_s
        self._on_enqueued = on_enqueued
        self._lock = asyncio.Lock()  # one sync at a time in this process
        self._changed: set[str] = set()
        self._wake = asyncio.Event()
        self._full = False
        self._closing = False
        self._tasks: list[asyncio.Task[None]] = []
        self.listening = asyncio.Event()  # set while the LISTEN is in place (tests wait on it)

    async def sync(self, user_id: str | None = None, *, rebind: bool = False) -> None:
        """Bring the bindings of ``user_id`` (None: every user) in step with the webhooks table, then enqueue
        what went past the queue before a binding. ``rebind``: bind every user with a webhook again, recorded
        or not (at start: the queue may have been recreated since)."""
        async with self._lock:
            wanted = await store.webhook_users(self._pool, user_id)
            recorded = await store.bound_users(self._pool, user_id)
            for user in sorted(wanted if rebind else wanted - recorded):
                await self._bind(webhook_binding_keys(user), True)
                await store.record_bound(self._pool, user)
                if user not in recorded:
                    log.info("bound the outcomes of user %s to the webhooks queue", user)
            for user in sorted(recorded - wanted):
                await self._bind(webhook_binding_keys(user), False)
                await store.record_unbound(self._pool, user)
                log.info("unbound the outcomes of user %s (no webhook left)", user)
            added = await store.catch_up(self._pool, user_id)
        metrics.BOUND_USERS.set(len(await store.bound_users(self._pool)))
        if added:
            log.info("enqueued %d outcome(s) published before their user's binding (from the event store)", added)
            metrics.ENQUEUED.inc(added)
            self._on_enqueued()

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._listen(), name="webhook-bindings-listen"),
            asyncio.create_task(self._run(), name="webhook-bindings-sync"),
        ]

    async def close(self) -> None:
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5.0)
        self._tasks = []

    def _notified(self, _conn: Any, _pid: int, _channel: str, user_id: object) -> None:
        self._changed.add(str(user_id))
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_full = loop.time() + self._resync_s
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(0.0, next_full - loop.time()))
            self._wake.clear()
            full = self._full or loop.time() >= next_full
            users, self._changed = self._changed, set()
            self._full = False
            try:
                if full:
                    next_full = loop.time() + self._resync_s
                    await self.sync()
                else:
                    for user in sorted(users):
                        await self.sync(user)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # RabbitMQ or Postgres unavailable, or a bug: a full resync soon
                log.warning("webhook bindings: sync failed, a full resync follows: %r", exc)
                self._full = True
                await asyncio.sleep(LISTEN_RECONNECT_S)
                self._wake.set()

    def _resync_soon(self) -> None:
        self._full = True  # whatever changed while nothing listened
        self._wake.set()

    async def _listen(self) -> None:
        await listen_forever(
            self._connect,
            store.CHANGED_CHANNEL,
            self._notified,
            listening=self.listening,
            on_listening=self._resync_soon,
            closing=lambda: self._closing,
            what="webhook change notifications",
        )

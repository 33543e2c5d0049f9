"""Coalescing: calls made while the previous batch is on its way go out together as the next batch.

Under load a service handles many messages at once, and they reach the same I/O step (a Redis
script, a Triton call) close together. Sending those calls as one batch (a Redis pipeline, one
batched tensor) turns N socket writes, N round trips and N wake-ups into one each; on this
platform a loopback ``send`` is among the dearest things a message costs.

The batching is the group-commit kind, with no timer: a call is sent at the end of the loop turn
it was made in, unless ``max_in_flight`` batches of its key are already on their way; then it waits
for one of them to return and goes out with every call that queued meanwhile. An idle service
therefore sends each call at once, and a busy one sends batches as large as its load makes them
(cut at ``max_batch``). Calls are grouped by a key (e.g. the model). A batch is sent in the context
(contextvars) of its first call, so its client spans join that call's trace.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")
R = TypeVar("R")

# Sends one batch: one result per item, in order; an exception in the list fails that item only,
# an exception raised fails the whole batch.
Send = Callable[[K, list[T]], Awaitable[Sequence[R | BaseException]]]


@dataclass(frozen=True, slots=True)
class _Call(Generic[T, R]):
    item: T
    future: asyncio.Future[R]
    context: contextvars.Context  # the caller's: tracing context of the batch it leads


class Coalescer(Generic[K, T, R]):
    def __init__(self, send: Send[K, T, R], *, max_batch: int, max_in_flight: int, name: str) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be >= 1")
        self._send = send
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._name = name
        self._pending: dict[K, list[_Call[T, R]]] = {}
        self._in_flight: dict[K, int] = {}
        self._flush_scheduled = False
        self._sending: set[asyncio.Task[None]] = set()

    async def call(self, key: K, item: T) -> R:
        """Queue ``item`` for the next batch of ``key`` and wait for its own result."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.setdefault(key, []).append(_Call(item, future, contextvars.copy_context()))
        self._schedule_flush()
        return await future

    @property
    def in_flight(self) -> int:
        """Batches being sent now."""
        return len(self._sending)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            # call_soon runs after the callbacks already due in this turn: every caller woken by
            # the same event (a pipeline's replies, a batch of deliveries) joins the batch.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        for key in list(self._pending):
            calls = [call for call in self._pending[key] if not call.future.done()]  # drop cancelled callers
            while calls and self._in_flight.get(key, 0) < self._max_in_flight:
                batch, calls = calls[: self._max_batch], calls[self._max_batch :]
                self._in_flight[key] = self._in_flight.get(key, 0) + 1
                task = asyncio.get_running_loop().create_task(
                    self._send_batch(key, batch), name=self._name, context=batch[0].context
                )
                self._sending.add(task)
                task.add_done_callback(self._sending.discard)
            if calls:
                self._pending[key] = calls  # sent when a batch of this key returns
            else:
                del self._pending[key]

    async def _send_batch(self, key: K, batch: list[_Call[T, R]]) -> None:
        try:
            await self._send_and_settle(key, batch)
        finally:
            self._in_flight[key] -= 1
            if key in self._pending:
                self._schedule_flush()

    async def _send_and_settle(self, key: K, batch: list[_Call[T, R]]) -> None:
        futures = [call.future for call in batch]
        try:
            results = await self._send(key, [call.item for call in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"{self._name}: {len(results)} results for a batch of {len(batch)}")
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()
            raise
        except BaseException as exc:
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        for future, result in zip(futures, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

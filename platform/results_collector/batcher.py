"""Micro-batching with retry: callers submit one item each and await the outcome of the batch holding it.

A batch is written when ``max_size`` items are waiting or ``max_wait_s`` after its first item.
Transient errors (the database is down) are retried with exponential backoff for as long as it
takes, while the callers keep waiting (their messages stay unacked: no requeue, no delivery count).
Any other error is isolated: the batch is retried item by item and only the items that still fail
get the error (their messages go to the dead-letter queue); the rest of the batch is written.
On ``close`` the batch in flight and the waiting items are written if that succeeds within the drain
timeout; whatever is left then gets ``ShuttingDown`` (the caller requeues it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, Generic, TypeVar

from mlp.backoff import Backoff

T = TypeVar("T")
R = TypeVar("R")

log = logging.getLogger(__name__)


class ShuttingDown(RuntimeError):
    """The item was not written because the batcher is closing; it must be redelivered."""


class ItemFailed(RuntimeError):
    """This item cannot be written (a permanent error); the cause is chained."""


# Half jitter: collectors do not retry in lockstep.
WRITE_BACKOFF: Final = Backoff(base_s=0.1, cap_s=5.0, jitter=0.5)


class Batcher(Generic[T, R]):
    def __init__(
        self,
        write: Callable[[list[T]], Awaitable[Sequence[R]]],
        *,
        max_size: int,
        max_wait_s: float,
        is_transient: Callable[[BaseException], bool],
        backoff: Backoff = WRITE_BACKOFF,
        name: str = "batcher",
    ) -> None:
        self._write = write
        self._max_size = max_size
        self._max_wait_s = max_wait_s
        self._is_transient = is_transient
        self._backoff = backoff
        self._name = name
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._in_flight: list[tuple[T, asyncio.Future[R]]] = []
        self._has_items = asyncio.Event()
        self._full = asyncio.Event()
        self._closing = False
        self._abandon = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.retries = 0  # transient failures seen (for metrics and tests)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=self._name)

    @property
    def waiting(self) -> int:
        return len(self._pending) + len(self._in_flight)

    async def submit(self, item: T) -> R:
        """Queue the item and wait until its batch is written. Raises ItemFailed or ShuttingDown."""
        if self._closing:
            raise ShuttingDown(f"{self._name} is closing")
        self.start()
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        self._has_items.set()
        if len(self._pending) >= self._max_size:
            self._full.set()
        return await future

    async def close(self, drain_timeout_s: float) -> None:
        """Write what is waiting if possible within the timeout; fail the rest with ShuttingDown."""
        self._closing = True
        self._has_items.set()
        self._full.set()
        if self._task is None:
            self._fail_all(ShuttingDown(f"{self._name} closed"))
            return
        done, _ = await asyncio.wait({self._task}, timeout=drain_timeout_s)
        if not done:
            log.warning(
                "%s: drain timed out with %d item(s) unwritten; they will be requeued", self._name, self.waiting
            )
            self._abandon.set()  # a retry loop gives up at its next sleep
            done, _ = await asyncio.wait({self._task}, timeout=1.0)
            if not done:  # stuck inside a write: cancel it (its transaction rolls back)
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        self._fail_all(ShuttingDown(f"{self._name} closed"))

    def _fail_all(self, exc: Exception) -> None:
        for _, future in [*self._in_flight, *self._pending]:
            if not future.done():
                future.set_exception(exc)
        self._in_flight = []
        self._pending = []

    async def _run(self) -> None:
        while True:
            await self._has_items.wait()
            if not self._pending:
                if self._closing:
                    return
                self._has_items.clear()
                continue
            if len(self._pending) < self._max_size and not self._closing:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._full.wait(), self._max_wait_s)
            self._in_flight = self._pending[: self._max_size]
            self._pending = self._pending[self._max_size :]
            if len(self._pending) < self._max_size and not self._closing:
                self._full.clear()
            await self._write_with_retry(self._in_flight)
            if self._abandon.is_set():
                return  # close() fails what is still unresolved, the in-flight batch included
            self._in_flight = []

    async def _write_with_retry(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        delays = self._backoff.delays()
        while True:
            try:
                results = await self._write([item for item, _ in batch])
            except Exception as exc:
                if not self._is_transient(exc):
                    log.warning("%s: batch of %d failed (%r); isolating the bad items", self._name, len(batch), exc)
                    await self._write_one_by_one(batch)
                    return
                self.retries += 1
                if self._abandon.is_set():
                    return
                delay = next(delays)
                log.warning("%s: write failed (%r), retrying %d item(s) in %.2fs", self._name, exc, len(batch), delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._abandon.wait(), delay)
                if self._abandon.is_set():
                    return
                continue
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
            return

    async def _write_one_by_one(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        for pair in batch:
            _, future = pair
            try:
                await self._write_with_retry_single(pair)
            except Exception as exc:
                if not future.done():
                    error = ItemFailed(f"{type(exc).__name__}: {exc}")
                    error.__cause__ = exc
                    future.set_exception(error)

    async def _write_with_retry_single(self, pair: tuple[T, asyncio.Future[R]]) -> None:
        item, future = pair
        delays = self._backoff.delays()
        while not self._abandon.is_set():
            try:
                (result,) = await self._write([item])
            except Exception as exc:
                if not self._is_transient(exc):
                    raise
                self.retries += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._abandon.wait(), next(delays))
                continue
            if not future.done():
                future.set_result(result)
            return

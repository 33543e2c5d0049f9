"""Acks in bulk: one ``basic.ack(multiple=True)`` for a run of finished deliveries instead of one frame each.

A consumer marks a delivery ``done`` once it may be acked (its outcome stored or confirmed). Delivery
tags of a channel are consecutive from 1, so the deliveries up to tag T are all done exactly when
every tag from the last acked one to T is: only then is one multiple ack sent, and it never covers a
delivery that is not done, or one the consumer settled on its own (a reject or a requeue, which also
count as finished for the run). A tag that is slow to finish holds the run back; the deliveries done
behind it are acked one by one after ``max_delay_s`` so that nothing waits on it for long.

On a quorum queue each ack frame is a Raft command of the queue: fewer frames, less broker work.

The acks of one channel reach the broker in the order they were decided, one at a time (``AckOutbox``).
aiormq queues every frame of a connection in a bounded ``asyncio.Queue``, whose ``put`` is not first come,
first served once it is full: an ack sent on its own task could overtake an earlier one, and a multiple
ack for tag 9 written before the ack for tag 7 leaves tag 7 unknown to the broker, which closes the
channel (PRECONDITION_FAILED) and with it the consumer.

``TagRun`` and ``AckOutbox`` are the pure bookkeeping; ``BulkAcker`` applies them to aiormq channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Final

from faststream.message import AckStatus
from faststream.rabbit import RabbitMessage

log = logging.getLogger(__name__)

DEFAULT_MAX_DELAY_S: Final = 0.5


@dataclass
class TagRun:
    """Finished delivery tags of one channel, and how far they run without a gap.

    ``acked_through``: every tag up to it is settled at the broker. ``waiting``: finished tags above it,
    True for those still to ack, False for those already settled one by one.
    """

    acked_through: int = 0
    waiting: dict[int, bool] = field(default_factory=dict)

    def finish(self, tag: int, *, needs_ack: bool) -> None:
        if tag > self.acked_through:
            self.waiting[tag] = needs_ack

    def advance(self) -> int | None:
        """Move past the run of finished tags; the tag to ack with ``multiple=True``, or None when the run
        holds nothing to ack (it was empty, or every tag in it was settled one by one)."""
        target = None
        while (tag := self.acked_through + 1) in self.waiting:
            if self.waiting.pop(tag):
                target = tag
            self.acked_through = tag
        return target

    def stragglers(self) -> list[int]:
        """Finished tags to ack one by one (the run is held back below them); marked as settled."""
        tags = [tag for tag, needs_ack in self.waiting.items() if needs_ack]
        for tag in tags:
            self.waiting[tag] = False
        return sorted(tags)


@dataclass
class AckOutbox:
    """The acks of one channel still to send, in an order that never leaves one unknown to the broker.

    A multiple ack for T covers every single ack at or below T still waiting (dropped); a single ack
    already covered by a multiple one sent or waiting is dropped too. ``next_frame`` hands out the
    multiple ack first, then the singles above it in tag order.
    """

    covered_through: int = 0  # the highest multiple ack sent or waiting
    multiple: int | None = None
    singles: set[int] = field(default_factory=set)

    def add(self, tag: int, *, multiple: bool) -> None:
        if tag <= self.covered_through:
            return
        if multiple:
            self.covered_through = self.multiple = tag
            self.singles = {t for t in self.singles if t > tag}
        else:
            self.singles.add(tag)

    def next_frame(self) -> tuple[int, bool] | None:
        """(tag, multiple) of the next ack to send, or None when nothing is owed."""
        if self.multiple is not None:
            tag, self.multiple = self.multiple, None
            return tag, True
        if self.singles:
            tag = min(self.singles)
            self.singles.discard(tag)
            return tag, False
        return None


class BulkAcker:
    """Coalesces the acks of a consumer's channels: ``done(message)`` instead of ``message.ack()``.

    Flushes once per loop turn in which something finished; ``close`` sends whatever is still owed.
    """

    def __init__(self, max_delay_s: float = DEFAULT_MAX_DELAY_S) -> None:
        self._max_delay_s = max_delay_s
        self._runs: dict[int, tuple[Any, TagRun]] = {}  # id(channel) -> (channel, its run)
        self._oldest_waiting: dict[int, float] = {}
        self._flush_scheduled = False
        self._sweeper: asyncio.Task[None] | None = None
        self._outboxes: dict[int, AckOutbox] = {}  # id(channel) -> what it still owes, while being sent
        self._sending: set[asyncio.Future[Any]] = set()
        self.frames = 0  # ack frames sent (tests, metrics)

    def done(self, message: RabbitMessage) -> None:
        """The delivery may be acked now; it is, with the run it completes."""
        message.committed = AckStatus.ACKED  # FastStream's view of it (its metrics count it as acked)
        self._finish(message, needs_ack=True)

    def settled(self, message: RabbitMessage) -> None:
        """The consumer settled the delivery itself (reject, nack): it no longer holds the run back."""
        self._finish(message, needs_ack=False)

    def _finish(self, message: RabbitMessage, *, needs_ack: bool) -> None:
        raw = message.raw_message
        tag, channel = raw.delivery_tag, raw.channel
        if tag is None or channel is None:
            return
        key = id(channel)
        entry = self._runs.get(key)
        if entry is None or entry[0] is not channel:
            entry = (channel, TagRun())
            self._runs[key] = entry
        entry[1].finish(tag, needs_ack=needs_ack)
        self._oldest_waiting.setdefault(key, time.monotonic())
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_soon)
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="bulk-acker-sweep")

    def _flush_soon(self) -> None:
        self._flush_scheduled = False
        for key, (channel, run) in list(self._runs.items()):
            if getattr(channel, "is_closed", False):
                # The broker requeued what the closed channel held; its tags mean nothing on the next.
                del self._runs[key]
                self._oldest_waiting.pop(key, None)
                continue
            target = run.advance()
            if not run.waiting:
                self._oldest_waiting.pop(key, None)
            if target is not None:
                self._send(channel, target, multiple=True)

    def _send(self, channel: Any, tag: int, *, multiple: bool) -> None:
        key = id(channel)
        outbox = self._outboxes.get(key)
        if outbox is not None:  # a sender of this channel is running: it takes this ack in turn
            outbox.add(tag, multiple=multiple)
            return
        outbox = self._outboxes[key] = AckOutbox()
        outbox.add(tag, multiple=multiple)
        task = asyncio.ensure_future(self._send_in_order(channel, key, outbox))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        task.add_done_callback(_log_failure)

    async def _send_in_order(self, channel: Any, key: int, outbox: AckOutbox) -> None:
        """Send a channel's acks one at a time, each written before the next is queued."""
        try:
            while (frame := outbox.next_frame()) is not None:
                tag, multiple = frame
                self.frames += 1
                await channel.basic_ack(delivery_tag=tag, multiple=multiple)
        finally:
            del self._outboxes[key]

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._max_delay_s)
            self._ack_stragglers(older_than_s=self._max_delay_s)

    def _ack_stragglers(self, older_than_s: float) -> None:
        now = time.monotonic()
        for key, (channel, run) in list(self._runs.items()):
            since = self._oldest_waiting.get(key)
            if since is None or now - since < older_than_s or getattr(channel, "is_closed", False):
                continue
            for tag in run.stragglers():
                self._send(channel, tag, multiple=False)
            self._oldest_waiting[key] = now

    async def close(self) -> None:
        """Send every ack still owed (before the channels close: a closed channel requeues them)."""
        self._flush_soon()
        self._ack_stragglers(older_than_s=0.0)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._sending:
            await asyncio.wait(set(self._sending), timeout=5.0)


def _log_failure(task: asyncio.Future[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:  # a closed channel: the broker requeues the deliveries, which are redelivered
        log.warning("bulk ack not sent (%s: %s); the broker redelivers", type(exc).__name__, exc)

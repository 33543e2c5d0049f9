"""``mlp dlq list|replay``: show dead-lettered messages, and re-drive them once their cause is fixed.

``list`` reads messages without losing them: it holds them unacked while it prints, then hands
them back (a crash of the tool closes the channel, which returns them too). ``replay``
re-publishes each to ``mlp.events`` with its original routing key (from ``x-death``),
persistent, mandatory and confirmed, and only then acks it in the DLQ.

Note: a replayed request whose outcome is already recorded (e.g. it ended
``delivery_limit_exceeded``) is dropped by the worker as a redelivery: each request has
exactly one terminal state.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, TextIO

import aio_pika
import msgspec
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustChannel

from events.topology import EVENTS_EXCHANGE, all_queues
from mlp.settings import Settings, get_settings

PREVIEW_CHARS: Final = 120
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 10_000
# Headers the broker sets per delivery or per death: a replayed message starts afresh.
_BROKER_HEADERS: Final = (
    "x-death",
    "x-first-death-exchange",
    "x-first-death-queue",
    "x-first-death-reason",
    "x-last-death-exchange",
    "x-last-death-queue",
    "x-last-death-reason",
    "x-delivery-count",
)
REPLAY_HEADER: Final = "x-mlp-replayed"


class _Ids(msgspec.Struct):
    type: object = None
    request_id: object = None


@dataclass(frozen=True)
class DeadLetter:
    """What ``list`` shows of one dead letter (a pure view of the message)."""

    queue: str
    routing_key: str | None  # the original routing key, from x-death
    reason: str
    count: int
    request_id: str
    type: str
    preview: str


def original_routing_key(headers: Mapping[str, Any]) -> str | None:
    """The routing key the message had before it died (the newest x-death entry first)."""
    deaths = headers.get("x-death")
    if not isinstance(deaths, list) or not deaths:
        return None
    first = deaths[0]
    keys = first.get("routing-keys") if isinstance(first, Mapping) else None
    if isinstance(keys, list) and keys:
        key = keys[0]
        return key.decode() if isinstance(key, bytes) else str(key)
    return None


def describe(queue: str, headers: Mapping[str, Any], body: bytes) -> DeadLetter:
    deaths = headers.get("x-death")
    death: Mapping[str, Any] = (
        deaths[0] if isinstance(deaths, list) and deaths and isinstance(deaths[0], Mapping) else {}
    )
    try:
        ids = msgspec.json.decode(body, type=_Ids)
    except msgspec.DecodeError:
        ids = _Ids()
    # Dead letters are untrusted: ascii() keeps control characters out of the terminal.
    preview = ascii(body[:PREVIEW_CHARS].decode("utf-8", errors="replace"))
    if len(body) > PREVIEW_CHARS:
        preview += f" (+{len(body) - PREVIEW_CHARS} bytes)"
    return DeadLetter(
        queue=queue,
        routing_key=original_routing_key(headers),
        reason=str(death.get("reason", headers.get("x-first-death-reason", "?"))),
        count=_int(death.get("count", 0)),
        request_id=ascii(ids.request_id)[1:-1] if isinstance(ids.request_id, str) else "?",
        type=ascii(ids.type)[1:-1] if isinstance(ids.type, str) else "?",
        preview=preview,
    )


def replay_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in headers.items() if k not in _BROKER_HEADERS}
    kept[REPLAY_HEADER] = _int(headers.get(REPLAY_HEADER, 0)) + 1
    return kept


def dead_letter_queues(models: Sequence[str]) -> list[str]:
    return [q.name for q in all_queues(tuple(models)) if q.dead_letter_queue is None]


def _int(value: object) -> int:
    try:
        return int(value)  # type: ignore[call-overload,no-any-return]
    except (TypeError, ValueError):
        return 0


def _format(letter: DeadLetter) -> str:
    return (
        f"{letter.queue}  key={letter.routing_key or '?'}  reason={letter.reason} x{letter.count}  "
        f"request_id={letter.request_id}  type={letter.type}\n    {letter.preview}"
    )


async def _get_all(queue: aio_pika.abc.AbstractQueue, limit: int) -> list[AbstractIncomingMessage]:
    messages: list[AbstractIncomingMessage] = []
    while len(messages) < limit:
        message = await queue.get(no_ack=False, fail=False, timeout=5)
        if message is None:
            break
        messages.append(message)
    return messages


async def list_dead_letters(settings: Settings, queues: Sequence[str], limit: int, out: TextIO) -> int:
    connection = await aio_pika.connect_robust(settings.rabbitmq_url, timeout=10)
    async with connection:
        total = 0
        for name in queues:
            # A channel per queue: a missing queue closes the channel that asked for it.
            channel = await connection.channel()
            try:
                queue = await channel.get_queue(name, ensure=True)
            except aio_pika.exceptions.ChannelNotFoundEntity:
                print(f"{name}: no such queue (a platform service declares the topology when it starts)", file=out)
                continue
            messages = await _get_all(queue, limit - total)
            try:
                for message in messages:
                    print(_format(describe(name, message.headers or {}, message.body)), file=out)
            finally:
                # Hand them all back only now: a requeued message would be read again by the next get.
                for message in messages:
                    await message.nack(requeue=True)
            total += len(messages)
            if total >= limit:
                break
        print(f"{total} dead letter(s) shown", file=out)
    return 0


async def replay_dead_letters(settings: Settings, queue_name: str, limit: int, out: TextIO) -> int:
    connection = await aio_pika.connect_robust(settings.rabbitmq_url, timeout=10)
    async with connection:
        channel: AbstractRobustChannel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        try:
            exchange = await channel.get_exchange(EVENTS_EXCHANGE, ensure=True)
            queue = await channel.get_queue(queue_name, ensure=True)
        except aio_pika.exceptions.ChannelNotFoundEntity as exc:
            print(f"mlp dlq: {exc}", file=out)
            return 1
        replayed = skipped = 0
        while replayed + skipped < limit:
            message = await queue.get(no_ack=False, fail=False, timeout=5)
            if message is None:
                break
            headers = dict(message.headers or {})
            key = original_routing_key(headers)
            if key is None:
                print(f"skipped {message.message_id}: no x-death routing key", file=out)
                await message.nack(requeue=True)
                skipped += 1
                continue
            try:
                await exchange.publish(
                    aio_pika.Message(
                        body=message.body,
                        headers=replay_headers(headers),
                        content_type=message.content_type,
                        message_id=message.message_id,
                        correlation_id=message.correlation_id,
                        type=message.type,
                        app_id="mlp-dlq",
                        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    ),
                    routing_key=key,
                    mandatory=True,
                    timeout=10,
                )
            except Exception as exc:  # returned, nacked or timed out: keep the dead letter
                await message.nack(requeue=True)
                print(f"replay of {message.message_id} to {key} failed: {type(exc).__name__}: {exc}", file=out)
                print(f"{replayed} replayed before the failure", file=out)
                return 1
            await message.ack()
            replayed += 1
            print(f"replayed {message.message_id} -> {EVENTS_EXCHANGE} {key}", file=out)
        print(f"{replayed} replayed, {skipped} skipped", file=out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlp dlq", description="List or re-drive dead-lettered messages.")
    sub = parser.add_subparsers(dest="command", required=True)
    show = sub.add_parser("list", help="show dead letters without consuming them")
    show.add_argument("--queue", help="a dead-letter queue (default: every DLQ of the served models)")
    show.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="most messages to show (%(default)s)")
    replay = sub.add_parser("replay", help="re-publish dead letters with their original routing key")
    replay.add_argument("--queue", required=True, help="the dead-letter queue to re-drive")
    replay.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="most messages to replay (%(default)s)")
    return parser


def main(argv: Sequence[str] | None = None, *, settings: Settings | None = None, out: TextIO | None = None) -> int:
    args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    settings = settings or get_settings()
    out = out or sys.stdout
    if not 1 <= args.limit <= MAX_LIMIT:
        print(f"mlp dlq: --limit must be 1..{MAX_LIMIT}", file=sys.stderr)
        return 2
    if args.command == "list":
        queues = [args.queue] if args.queue else dead_letter_queues(settings.models)
        return asyncio.run(list_dead_letters(settings, queues, args.limit, out))
    return asyncio.run(replay_dead_letters(settings, args.queue, args.limit, out))


if __name__ == "__main__":
    raise SystemExit(main())

"""Submit one inference over RabbitMQ and wait for its outcome (aio-pika; no platform code needed).

    MLP_BUS_URL=amqp://mlp-external:<password>@rabbitmq:5672/ \
        python examples/bus_client.py --user mlp-external --model basic-model --prompt "test prompt"

The pattern (docs/bus.md): bind a queue of your own to the outcome routing keys FIRST, then publish
the ``InferenceRequested`` event persistent, mandatory and with publisher confirms, then wait for the
one terminal event of your request_id (a UUID here; ``<user>.<your id>`` works too). Prints that
event as JSON; exits 0 when it is ``InferenceCompleted``, 1 when failed or rejected, 2 on timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote, urlsplit

import aio_pika

EXCHANGE = "mlp.events"
TERMINAL = ("InferenceCompleted", "InferenceFailed", "InferenceRejected", "InferenceCancelled", "InferenceExpired")


def uuid7() -> str:
    """A time-ordered UUID (RFC 9562 version 7), as the platform's event ids are."""
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC variant
    return str(uuid.UUID(int=value))


def request_event(user_id: str, model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """The fields a publisher must fill (see docs/asyncapi.yaml, InferenceRequested)."""
    return {
        "type": "InferenceRequested",
        "event_id": uuid7(),
        "request_id": uuid7(),
        "occurred_at": datetime.now(UTC).isoformat(),
        "user_id": user_id,
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "source": "bus",
    }


async def submit_and_wait(url: str, event: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
    rabbit_user = unquote(urlsplit(url).username or "guest")
    connection = await aio_pika.connect(url)
    async with connection:
        # Confirms + returned messages raise: a publish is either accepted by the broker or an error.
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        # Exclusive + auto-delete: the queue lives as long as this connection (use a durable queue
        # with a fixed name instead when outcomes must survive a restart of the client).
        queue = await channel.declare_queue(f"ext.{rabbit_user}.{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        exchange = await channel.get_exchange(EXCHANGE, ensure=False)
        for kind in ("completed", "failed", "rejected", "cancelled", "expired"):
            await queue.bind(exchange, routing_key=f"inference.{kind}.{event['model']}.{event['user_id']}")

        await exchange.publish(
            aio_pika.Message(
                json.dumps(event).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event["event_id"],
                correlation_id=event["request_id"],
                type="InferenceRequested",
            ),
            routing_key=f"inference.requested.{event['model']}.{event['user_id']}",
            mandatory=True,
        )

        try:
            async with asyncio.timeout(timeout_s), queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        outcome: dict[str, Any] = json.loads(message.body)
                    # A refusal that may not touch the request it names (docs/bus.md, Request identity)
                    # arrives on "<user>.rejected-<event_id>", with correlation_id = our request_id.
                    ours = event["request_id"] in (outcome.get("request_id"), outcome.get("correlation_id"))
                    if ours and outcome.get("type") in TERMINAL:
                        return outcome
        except TimeoutError:
            return None
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=os.environ.get("MLP_BUS_URL", "amqp://guest:guest@127.0.0.1:5672/"))
    parser.add_argument("--user", required=True, help="the platform user_id to charge")
    parser.add_argument("--model", default="basic-model")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the outcome")
    args = parser.parse_args(argv)

    event = request_event(args.user, args.model, args.prompt, args.max_tokens)
    print(f"submitted request {event['request_id']}", file=sys.stderr)
    outcome = asyncio.run(submit_and_wait(args.url, event, args.timeout))
    if outcome is None:
        print(f"no outcome for {event['request_id']} within {args.timeout}s", file=sys.stderr)
        return 2
    print(json.dumps(outcome))
    return 0 if outcome["type"] == "InferenceCompleted" else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""What a work queue holds, read off the real broker: for tests that assert on what was published."""

from __future__ import annotations

import aio_pika

from events.model import InferenceRequested, decode_event
from events.topology import requests_queue
from mlp.settings import Settings


async def drain_requests(settings: Settings, model: str = "basic-model") -> list[InferenceRequested]:
    """Take every message from ``model``'s request queue (so each test sees only its own)."""
    connection = await aio_pika.connect(settings.rabbitmq_url)
    found: list[InferenceRequested] = []
    async with connection:
        channel = await connection.channel()
        queue = await channel.get_queue(requests_queue(model).name, ensure=False)
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            event = decode_event(message.body)
            assert isinstance(event, InferenceRequested)
            found.append(event)
    return found

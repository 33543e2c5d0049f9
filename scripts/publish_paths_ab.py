"""CPU per confirmed publish: FastStream's publish path against ``mlp.bus.EventPublisher``, interleaved A/B/A/B.

Each arm publishes N ``InferenceCompleted`` events (persistent, mandatory, confirmed), C at once, into a
quorum queue on the real RabbitMQ, in a vhost of its own (``tests.support.isolation``: a live
platform's consumers never see these events), with the platform's metrics middleware on the broker
(``BusMetrics``), and prints wall time, this process's CPU and RabbitMQ's CPU (``beam.smp``, from /proc)
per publish. Run from the repository root (docs/benchmarks.md, "Against the plain Celery pipeline, round 6"):

    PYTHONPATH=$PWD/platform:$PWD N=20000 C=64 ROUNDS=2 .venv/bin/python scripts/publish_paths_ab.py
"""

from __future__ import annotations

import asyncio
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from faststream.rabbit import RabbitBroker, RabbitQueue
from faststream.rabbit.schemas.queue import QueueType
from prometheus_client import CollectorRegistry

from events.model import InferenceCompleted, encode_event, new_event_id, utc_now
from events.topology import routing_key
from mlp.bus import EVENTS, EventPublisher
from mlp.telemetry.bus_metrics import BusMetrics
from tests.support.isolation import isolated_namespace

N = int(os.environ.get("N", "20000"))
C = int(os.environ.get("C", "64"))
ROUNDS = int(os.environ.get("ROUNDS", "2"))
QUEUE = RabbitQueue("mlp.bench.publish-paths", queue_type=QueueType.QUORUM, durable=True, routing_key="inference.#")


def _event(i: int) -> InferenceCompleted:
    return InferenceCompleted(
        event_id=new_event_id(),
        request_id=new_event_id(),
        occurred_at=utc_now(),
        user_id=f"bench-{i % 500}",
        model="basic-model",
        completion="x" * 64,
        prompt_tokens=9,
        completion_tokens=16,
        latency_ms=3.0,
        traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    )


def _broker_cpu_s() -> float:
    pids = subprocess.run(["pgrep", "-f", "beam.smp"], capture_output=True, text=True).stdout.split()
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _arm(name: str, url: str) -> None:
    broker = RabbitBroker(url, middlewares=(BusMetrics(CollectorRegistry(), "publish-paths"),), apply_types=False)
    await broker.connect()
    try:
        exchange = await broker.declare_exchange(EVENTS)
        queue = await broker.declare_queue(QUEUE)
        await queue.bind(exchange, routing_key="inference.#")
        await queue.purge()
        publisher = EventPublisher(broker, timeout_s=10)
        events = [_event(i) for i in range(N)]
        limit = asyncio.Semaphore(C)

        async def faststream(event: InferenceCompleted) -> None:
            # What EventPublisher did before round 6.
            await broker.publish(
                encode_event(event),
                exchange=EVENTS,
                routing_key=routing_key(event),
                persist=True,
                mandatory=True,
                message_id=event.event_id,
                correlation_id=event.request_id,
                content_type="application/json",
                message_type=type(event).__name__,
                headers={"traceparent": event.traceparent},
                timeout=10,
            )

        publish = faststream if name == "faststream" else publisher.publish

        async def one(event: InferenceCompleted) -> None:
            async with limit:
                await publish(event)

        cpu0, broker0, t0 = _own_cpu_s(), _broker_cpu_s(), time.perf_counter()
        await asyncio.gather(*(one(e) for e in events))
        wall, cpu, broker_cpu = time.perf_counter() - t0, _own_cpu_s() - cpu0, _broker_cpu_s() - broker0
        print(
            f"{name:15s} wall {wall / N * 1e6:6.1f} us  client CPU {cpu / N * 1e6:6.1f} us"
            f"  RabbitMQ CPU {broker_cpu / N * 1e6:6.1f} us  per publish",
            flush=True,
        )
        await queue.purge()
    finally:
        await broker.stop()


async def main(url: str) -> int:
    for _ in range(ROUNDS):
        for name in ("faststream", "EventPublisher"):
            await _arm(name, url)
    return 0


if __name__ == "__main__":
    with isolated_namespace("publish-paths") as ns:
        sys.exit(asyncio.run(main(ns.rabbitmq_url)))

"""Tracing ON vs OFF for a tight publish+consume loop through FastStream over the real RabbitMQ.

Each mode runs in its own process (the tracer provider is once per process), alternating OFF/ON
twice in one run; the rates are printed (``pytest -s``), never asserted: timing goals belong to the
benchmark. The test asserts what must hold in both modes: every message arrives, and with tracing
on the spans reach the OTLP receiver. ``MLP_TELEMETRY_BENCH_MESSAGES`` sets the message count.

Also a child program: ``python test_telemetry_overhead.py <queue> <messages>``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()
MESSAGES = int(os.environ.get("MLP_TELEMETRY_BENCH_MESSAGES", "2000"))
WINDOW = 100  # confirmed publishes in flight at once


async def _loop(queue_name: str, messages: int) -> dict[str, Any]:
    from faststream.rabbit import RabbitQueue

    from mlp.bus import make_broker
    from mlp.settings import Settings
    from mlp.telemetry import broker_middlewares, setup_telemetry, span

    settings = Settings()
    logging.disable(logging.INFO)  # no access-log lines in the loop: measure tracing, not log I/O
    telemetry = setup_telemetry("bench", settings)
    broker = make_broker(settings, middlewares=broker_middlewares(telemetry))
    received = 0
    done = asyncio.Event()
    queue = RabbitQueue(queue_name, durable=True)

    @broker.subscriber(queue)
    async def consume(body: dict[str, Any]) -> None:
        nonlocal received
        with span("handle"):
            received += 1
        if received >= messages:
            done.set()

    await broker.start()
    started, cpu_started = time.perf_counter(), time.process_time()
    for first in range(0, messages, WINDOW):
        await asyncio.gather(
            *(
                broker.publish({"n": n}, queue=queue, persist=True, mandatory=True)
                for n in range(first, min(first + WINDOW, messages))
            )
        )
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - started
    await broker.stop()
    flushed = telemetry.shutdown(timeout_s=30)  # the export thread's CPU counts too
    cpu = time.process_time() - cpu_started
    return {
        "tracing": telemetry.enabled,
        "received": received,
        "seconds": elapsed,
        "rate": messages / elapsed,
        # CPU per message of this process: steadier than wall-clock rates on a shared, loaded machine.
        "cpu_us_per_msg": cpu / messages * 1e6,
        "flushed": flushed,
    }


def _run(mode: str, queue: str, namespace_env: dict[str, str], otel_env: dict[str, str]) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(namespace_env)
    if mode == "on":
        # Defaults of a service, except the schedule delay: spans leave as the loop runs.
        env.update(otel_env)
    done = subprocess.run(
        [sys.executable, str(HERE), queue, str(MESSAGES)], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def test_tracing_overhead_on_a_publish_consume_loop(namespace: Any) -> None:
    from faststream.rabbit import RabbitBroker, RabbitQueue

    from tests.support.otlp import OtlpReceiver

    queue = f"tel.bench.{uuid.uuid4().hex[:8]}"
    broker = RabbitBroker(namespace.rabbitmq_url, log_level=30)
    await broker.connect()
    await broker.declare_queue(RabbitQueue(queue, durable=True))
    try:
        with OtlpReceiver() as receiver:
            otel_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint, "OTEL_TRACES_SAMPLER": "always_on"}
            runs = {"off": [], "on": []}  # type: dict[str, list[dict[str, Any]]]
            for mode in ("off", "on", "off", "on"):
                runs[mode].append(_run(mode, queue, namespace.env(), otel_env))
            spans = len(receiver.spans())
    finally:
        await broker.stop()

    for mode, results in runs.items():
        assert all(r["received"] == MESSAGES for r in results)
        assert all(r["tracing"] is (mode == "on") for r in results)
        assert all(r["flushed"] for r in results)
    # Per message: create + publish (producer), process + handle (consumer).
    assert spans > 0
    off = statistics.median(r["rate"] for r in runs["off"])
    on = statistics.median(r["rate"] for r in runs["on"])
    cpu_off = statistics.median(r["cpu_us_per_msg"] for r in runs["off"])
    cpu_on = statistics.median(r["cpu_us_per_msg"] for r in runs["on"])
    print(
        f"\ntracing overhead, {MESSAGES} messages publish+consume, median of 2 runs each: "
        f"OFF {off:.0f} msg/s, ON {on:.0f} msg/s, ON/OFF {on / off:.2f}; "
        f"CPU/msg OFF {cpu_off:.0f} us, ON {cpu_on:.0f} us; "
        f"spans received {spans} (of {4 * MESSAGES * 2} made)"
    )


if __name__ == "__main__":
    print(json.dumps(asyncio.run(_loop(sys.argv[1], int(sys.argv[2])))))

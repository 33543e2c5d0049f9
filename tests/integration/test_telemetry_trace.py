"""One trace across two real processes over the real RabbitMQ, exported with the real OTLP/HTTP exporter.

A publisher process starts a root span and publishes through FastStream with the telemetry middleware;
a consumer process handles the message inside a span and publishes a reply, which the publisher
consumes. Both export to :class:`tests.support.otlp.OtlpReceiver`. The trace must hold every span,
with the parent links the messaging conventions give (create -> process -> handler -> create -> process).

This file is also the child program: ``python test_telemetry_trace.py consumer|publisher ...``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve()
PUBLISHER = "tel-publisher"
CONSUMER = "tel-consumer"
READY = "READY"
RESULT = "RESULT "


def _result(stdout: str) -> Any:
    return json.loads(next(line for line in stdout.splitlines() if line.startswith(RESULT))[len(RESULT) :])


# --- the child processes ------------------------------------------------------------------------


class ModelFailure(RuntimeError):
    error_code = "model_error"


async def _consumer(work_queue: str, reply_queue: str, expected: int) -> None:
    from faststream.rabbit import RabbitQueue

    from mlp.bus import make_broker
    from mlp.logs import bind_request_id, setup_logging
    from mlp.settings import Settings
    from mlp.telemetry import broker_middlewares, current_traceparent, setup_telemetry, span

    settings = Settings()
    telemetry = setup_telemetry("ignored-because-OTEL_SERVICE_NAME-wins", settings)
    setup_logging(CONSUMER, settings)  # JSON lines on stdout, as in a container
    log = logging.getLogger("tel.consumer")
    broker = make_broker(settings, middlewares=broker_middlewares(telemetry))
    handled = 0
    done = asyncio.Event()

    @broker.subscriber(RabbitQueue(work_queue, durable=True))
    async def handle(body: dict[str, Any]) -> None:
        nonlocal handled
        outcome = "completed"
        with bind_request_id(body["request_id"]):
            try:
                with span("handle", request_id=body["request_id"]):
                    if body["kind"] == "fail":
                        raise ModelFailure("the model refused")
                    traceparent = current_traceparent()
                    log.info("handled", extra={"outcome": "completed"})
            except ModelFailure:
                outcome = "failed"
                traceparent = None
            # Published inside the process span: the reply joins the same trace.
            await broker.publish(
                {"request_id": body["request_id"], "outcome": outcome, "traceparent": traceparent},
                queue=reply_queue,
                persist=True,
                mandatory=True,
            )
        handled += 1
        if handled >= expected:
            done.set()

    await broker.start()
    print(READY, flush=True)
    await asyncio.wait_for(done.wait(), 60)
    await broker.stop()
    print(RESULT + json.dumps({"flushed": telemetry.shutdown(timeout_s=10)}), flush=True)


async def _publisher(work_queue: str, reply_queue: str) -> None:
    from faststream.rabbit import RabbitQueue

    from mlp.bus import make_broker
    from mlp.settings import Settings
    from mlp.telemetry import broker_middlewares, current_trace_id, setup_telemetry, span

    settings = Settings()
    telemetry = setup_telemetry(PUBLISHER, settings)
    broker = make_broker(settings, middlewares=broker_middlewares(telemetry))
    replies: dict[str, dict[str, Any]] = {}
    both = asyncio.Event()

    @broker.subscriber(RabbitQueue(reply_queue, durable=True))
    async def on_reply(body: dict[str, Any]) -> None:
        replies[body["request_id"]] = body
        if len(replies) == 2:
            both.set()

    await broker.start()
    trace_ids: dict[str, str | None] = {}
    for kind in ("ok", "fail"):
        with span("submit", kind=kind):
            trace_ids[kind] = current_trace_id()
            await broker.publish({"request_id": kind, "kind": kind}, queue=work_queue, persist=True, mandatory=True)
    await asyncio.wait_for(both.wait(), 60)
    await broker.stop()
    flushed = telemetry.shutdown(timeout_s=10)
    print(RESULT + json.dumps({"trace_ids": trace_ids, "replies": replies, "flushed": flushed}), flush=True)


# --- the test -----------------------------------------------------------------------------------


def _child_env(namespace_env: dict[str, str], otel_env: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    return {**env, **namespace_env, **otel_env, "MLP_LOG_FORMAT": "json"}


async def test_two_processes_share_one_trace_with_correct_parent_links(namespace: Any) -> None:
    from faststream.rabbit import RabbitBroker, RabbitQueue

    from tests.support.otlp import OtlpReceiver, one

    suffix = uuid.uuid4().hex[:8]
    work_queue, reply_queue = f"tel.work.{suffix}", f"tel.reply.{suffix}"
    # Declared before either child runs: a mandatory publish to a missing queue would be returned.
    broker = RabbitBroker(namespace.rabbitmq_url, log_level=30)
    await broker.connect()
    for name in (work_queue, reply_queue):
        await broker.declare_queue(RabbitQueue(name, durable=True))

    try:
        with OtlpReceiver() as receiver:
            consumer = subprocess.Popen(
                [sys.executable, str(HERE), "consumer", work_queue, reply_queue, "2"],
                env=_child_env(namespace.env(), receiver.env(CONSUMER)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            try:
                assert consumer.stdout is not None
                early = []
                for line in consumer.stdout:  # logs come first, on the same stdout
                    early.append(line)
                    if line.strip() == READY:
                        break
                else:
                    pytest.fail(f"consumer did not start: {''.join(early)} {consumer.communicate()[1]}")
                published = subprocess.run(
                    [sys.executable, str(HERE), "publisher", work_queue, reply_queue],
                    env=_child_env(namespace.env(), receiver.env(PUBLISHER)),
                    capture_output=True,
                    text=True,
                    timeout=120,
                )
                assert published.returncode == 0, published.stderr
                consumer_out, consumer_err = consumer.communicate(timeout=60)
            finally:
                if consumer.poll() is None:
                    consumer.kill()
                    consumer.wait()
            assert consumer.returncode == 0, consumer_err
            result = _result(published.stdout)
            assert result["flushed"] is True
            consumer_out = "".join(early) + consumer_out
            assert _result(consumer_out) == {"flushed": True}

            ok_trace = result["trace_ids"]["ok"]
            spans = receiver.wait_for_trace(
                ok_trace,
                names={"submit", "handle", f"default.{work_queue} process", f"default.{reply_queue} process"},
                timeout_s=30,
            )
            failed_trace = result["trace_ids"]["fail"]
            failed_spans = receiver.wait_for_trace(failed_trace, names={"handle"}, timeout_s=30)
    finally:
        await broker.stop()

    # -- one trace, two services, correct parents --
    assert {s.service_name for s in spans} == {PUBLISHER, CONSUMER}
    by_id = {s.span_id: s for s in spans}
    submit = one(spans, "submit", PUBLISHER)
    assert submit.parent_span_id is None
    work_create = one(spans, f"default.{work_queue} create", PUBLISHER)
    work_publish = one(spans, f"default.{work_queue} publish", PUBLISHER)
    work_process = one(spans, f"default.{work_queue} process", CONSUMER)
    handle = one(spans, "handle", CONSUMER)
    reply_create = one(spans, f"default.{reply_queue} create", CONSUMER)
    reply_process = one(spans, f"default.{reply_queue} process", PUBLISHER)
    assert work_create.parent_span_id == submit.span_id
    assert work_publish.parent_span_id == work_create.span_id
    assert work_process.parent_span_id == work_create.span_id  # context crossed the AMQP headers
    assert handle.parent_span_id == work_process.span_id
    assert reply_create.parent_span_id == work_process.span_id
    assert reply_process.parent_span_id == reply_create.span_id
    assert work_process.kind == "CONSUMER"
    assert work_publish.kind == "PRODUCER"
    assert work_process.attributes["messaging.system"] == "rabbitmq"
    assert all(s.parent_span_id is None or s.parent_span_id in by_id for s in spans)
    assert handle.attributes["request_id"] == "ok"
    assert handle.status == "UNSET"
    # The traceparent the handler stored (as an event field would) names the handler span itself.
    version, trace_id, parent_id, flags = result["replies"]["ok"]["traceparent"].split("-")
    assert (version, trace_id, parent_id) == ("00", ok_trace, handle.span_id)
    assert int(flags, 16) & 0x01  # sampled (the SDK may also set the W3C level-2 "random" bit)
    # Resource: OTEL_SERVICE_NAME won over the name in code; our attributes are there.
    assert handle.resource["deployment.environment"] == "test"
    assert "service.version" in handle.resource
    assert "host.name" in handle.resource

    # -- the failed request: error status and the platform's error code --
    failed_handle = one(failed_spans, "handle", CONSUMER)
    assert failed_handle.status == "ERROR"
    assert failed_handle.attributes["error.code"] == "model_error"
    assert "exception" in failed_handle.events
    assert result["replies"]["fail"]["outcome"] == "failed"

    # -- the consumer's JSON log line carries the trace, the span and the request id --
    lines = [json.loads(line) for line in consumer_out.splitlines() if line.startswith("{")]
    handled = [line for line in lines if line["message"] == "handled"]
    assert len(handled) == 1
    assert handled[0]["trace_id"] == ok_trace
    assert handled[0]["span_id"] == handle.span_id
    assert handled[0]["request_id"] == "ok"
    assert handled[0]["service"] == CONSUMER
    assert handled[0]["outcome"] == "completed"


if __name__ == "__main__":
    role, *args = sys.argv[1:]
    if role == "consumer":
        asyncio.run(_consumer(args[0], args[1], int(args[2])))
    else:
        asyncio.run(_publisher(args[0], args[1]))

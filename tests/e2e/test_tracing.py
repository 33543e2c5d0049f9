"""One trace per request across the real processes, exported over real OTLP/HTTP to a test receiver.

gateway (FastAPI server span, publish) -> worker (process span, request span, Triton client span,
gRPC span, outcome publish) -> collector (process span, projection span per stored event). The
read API returns the trace id the gateway stored; a failed request's worker span carries ERROR and
the InferenceFailed error code.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.isolation import isolated_namespace
from tests.support.otlp import CollectedSpan, OtlpReceiver, one
from tests.support.services import Platform, running_platform

pytestmark = pytest.mark.e2e

GATEWAY, WORKER, COLLECTOR = "api-gateway", "ml-worker", "results-collector"
SUBMIT_SPAN = "POST /api/v1/inference"
REQUEST_SPAN = "handle InferenceRequested"
TRITON_SPAN = "triton infer"
GRPC_SPAN = "/inference.GRPCInferenceService/ModelInfer"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def platform(triton_grpc_url: str, receiver: OtlpReceiver) -> Iterator[Platform]:
    extra = {
        **receiver.env(),
        "OTEL_SDK_DISABLED": "false",
        # slow-model sleeps 5 s: with a 2 s timeout and no retry it fails with triton_timeout.
        "MLP_MODELS": "basic-model,slow-model",
        "MLP_TRITON_TIMEOUT_S": "2",
        "MLP_TRITON_RETRIES": "0",
    }
    with isolated_namespace("e2e-trace") as ns, running_platform(ns, triton_grpc_url, extra_env=extra) as running:
        yield running


def _submit_and_finish(platform: Platform, model: str) -> dict[str, object]:
    body = {"prompt": "test prompt", "user_id": "trace-user", "model": model}
    submitted = httpx.post(f"{platform.gateway_url}/api/v1/inference", json=body, timeout=10)
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]
    final = httpx.get(f"{platform.api_url}/api/v1/inference/{request_id}", params={"wait": 30}, timeout=40)
    assert final.status_code == 200, f"{final.text}\n{platform.logs()}"
    view: dict[str, object] = final.json()
    assert view["status"] in {"completed", "failed"}, f"{view}\n{platform.logs()}"
    return view


def _connected(spans: list[CollectedSpan]) -> bool:
    """Every parent is in the trace (children can arrive before their parents)."""
    ids = {s.span_id for s in spans}
    return all(s.parent_span_id is None or s.parent_span_id in ids for s in spans)


def _wait_for_request_trace(receiver: OtlpReceiver, trace_id: str, outcome_type: str) -> list[CollectedSpan]:
    wanted = {SUBMIT_SPAN, REQUEST_SPAN, TRITON_SPAN, f"project {outcome_type}", "project InferenceRequested"}

    def complete(all_spans: list[CollectedSpan]) -> bool:
        mine = [s for s in all_spans if s.trace_id == trace_id]
        return wanted <= {s.name for s in mine} and _connected(mine)

    return [s for s in receiver.wait_for(complete, timeout_s=60) if s.trace_id == trace_id]


def _by_id(spans: list[CollectedSpan]) -> dict[str, CollectedSpan]:
    return {s.span_id: s for s in spans}


def _ancestors(span: CollectedSpan, spans: list[CollectedSpan]) -> list[CollectedSpan]:
    index = _by_id(spans)
    chain: list[CollectedSpan] = []
    current = span
    while current.parent_span_id is not None:
        current = index[current.parent_span_id]
        chain.append(current)
    return chain


def test_one_trace_holds_gateway_worker_triton_and_collector(platform: Platform, receiver: OtlpReceiver) -> None:
    view = _submit_and_finish(platform, "basic-model")
    assert view["status"] == "completed", view
    trace_id = view["trace_id"]
    assert isinstance(trace_id, str), view
    assert len(trace_id) == 32, view  # what a user pastes into Jaeger

    spans = _wait_for_request_trace(receiver, trace_id, "InferenceCompleted")
    services = {s.service_name for s in spans}
    assert {GATEWAY, WORKER, COLLECTOR} <= services, services

    # One root: the gateway's server span; everything else hangs below it.
    roots = [s for s in spans if s.parent_span_id is None]
    assert [(r.service_name, r.name, r.kind) for r in roots] == [(GATEWAY, SUBMIT_SPAN, "SERVER")]
    root = roots[0]

    # Worker: its request span continues from FastStream's process span, which continues from the
    # gateway's publish (context from the AMQP headers).
    handle = one(spans, REQUEST_SPAN, WORKER)
    process = _by_id(spans)[handle.parent_span_id or ""]
    assert (process.service_name, process.kind) == (WORKER, "CONSUMER")
    assert process.name.endswith(" process")
    chain = _ancestors(handle, spans)
    assert chain[-1] == root
    assert any(s.service_name == GATEWAY and s.kind == "PRODUCER" for s in chain), chain
    assert handle.status == "UNSET"
    assert handle.attributes["mlp.outcome"] == "completed"
    assert handle.attributes["mlp.request_id"] == view["request_id"]

    # Triton: a client span under the request span; gRPC's client span below it carried the context.
    triton = one(spans, TRITON_SPAN, WORKER)
    assert triton.kind == "CLIENT"
    assert triton.parent_span_id == handle.span_id
    grpc = one(spans, GRPC_SPAN, WORKER)
    assert grpc.kind == "CLIENT"
    assert grpc.parent_span_id == triton.span_id

    # Collector: each stored event's projection span sits under the collector's process span of its
    # message; the outcome's message was published from inside the worker's request span.
    completed = one(spans, "project InferenceCompleted", COLLECTOR)
    collector_process = _by_id(spans)[completed.parent_span_id or ""]
    assert (collector_process.service_name, collector_process.kind) == (COLLECTOR, "CONSUMER")
    assert handle in _ancestors(completed, spans)
    requested = one(spans, "project InferenceRequested", COLLECTOR)
    assert handle not in _ancestors(requested, spans)  # the request's own event comes straight from the gateway
    assert _ancestors(requested, spans)[-1] == root

    # The projection batch is its own trace, linked to this one (not received as a child here).
    assert not any(s.name == "project batch" for s in spans)
    batches = [s for s in receiver.spans() if s.name == "project batch" and s.service_name == COLLECTOR]
    assert batches
    assert all(b.parent_span_id is None for b in batches)


def test_a_failed_request_carries_error_status_and_code(platform: Platform, receiver: OtlpReceiver) -> None:
    view = _submit_and_finish(platform, "slow-model")
    assert view["status"] == "failed", view
    error = view["error"]
    assert isinstance(error, dict), view
    assert error["code"] == "triton_timeout", view
    trace_id = view["trace_id"]
    assert isinstance(trace_id, str)

    spans = _wait_for_request_trace(receiver, trace_id, "InferenceFailed")
    handle = one(spans, REQUEST_SPAN, WORKER)
    assert handle.status == "ERROR"
    assert handle.attributes["error.code"] == "triton_timeout"
    assert handle.attributes["mlp.outcome"] == "failed"
    triton = one(spans, TRITON_SPAN, WORKER)
    assert triton.status == "ERROR"
    assert triton.attributes["error.code"] == "triton_timeout"
    # The gRPC call itself ended with DEADLINE_EXCEEDED.
    assert one(spans, GRPC_SPAN, WORKER).status == "ERROR"

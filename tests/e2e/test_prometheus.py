"""A real Prometheus (its own port and storage, 1 s scrapes) scraping the real services, Triton and
RabbitMQ's exporter, with the rules of k8s/monitoring/rules.yaml: after a known load the recording
rules hold the expected values, every metric the rules and the dashboard read exists, an alert goes
pending on a real dead letter, the KEDA queries of k8s/ answer numbers, and the books reconcile.

The load: warm-up requests first (a counter's first sample is not counted by rate(): the warm-up
creates the series), then N completions on basic-model and K failures (slow-model answers after 5 s,
the workers give up after MLP_TRITON_TIMEOUT_S=2 with no retry: triton_timeout).
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aio_pika
import asyncpg
import httpx
import pytest
import yaml

from events.registry import QUICKSTART_MODELS
from events.topology import PROJECTIONS_QUEUE, WEBHOOKS_QUEUE, requests_queue
from ml_service.launcher import TritonProcess
from mlp.settings import Settings
from ops import reconcile
from tests.monitoring.promql import (
    EXTERNAL_METRICS,
    RULES_FILE,
    dashboard_panels,
    load_dashboard,
    load_rules,
    metric_names,
    prometheus_targets,
    recorded_names,
)
from tests.support.isolation import Namespace, isolated_namespace
from tests.support.prometheus import Prometheus, ScrapeJob, prometheus_config, running_prometheus
from tests.support.services import Platform, running_platform

pytestmark = [pytest.mark.e2e, pytest.mark.monitoring]

REPO = Path(__file__).resolve().parents[2]
N, K = 8, 2  # completed on basic-model, failed on slow-model (after the warm-up's one of each)
USER = "prom-user"
RABBITMQ_EXPORTER_VARIABLE = "MLP_TEST_RABBITMQ_PROMETHEUS_URL"


@dataclass
class Load:
    namespace: Namespace
    platform: Platform
    prometheus: Prometheus
    tokens: int  # prompt + completion tokens of the N completions
    latencies_s: list[float]  # submit to outcome, of the N completions (the events' times)
    warm_up_latency_s: float  # of the warm-up's completion
    started: float  # time.time() before the warm-up


def _submit(platform: Platform, model: str, user: str = USER) -> str:
    body = {"prompt": "count these tokens please", "user_id": user, "model": model}
    response = httpx.post(f"{platform.gateway_url}/api/v1/inference", json=body, timeout=10)
    assert response.status_code == 202, response.text
    request_id: str = response.json()["request_id"]
    return request_id


def _outcome(platform: Platform, request_id: str) -> dict[str, Any]:
    response = httpx.get(f"{platform.api_url}/api/v1/inference/{request_id}", params={"wait": 30}, timeout=40)
    assert response.status_code == 200, response.text
    view: dict[str, Any] = response.json()
    assert view["status"] in ("completed", "failed"), view
    return view


def _run(platform: Platform, completions: int, failures: int) -> list[dict[str, Any]]:
    ids = [_submit(platform, "basic-model") for _ in range(completions)]
    ids += [_submit(platform, "slow-model") for _ in range(failures)]
    return [_outcome(platform, rid) for rid in ids]


def _dead_letter_a_poison_message(rabbitmq_url: str) -> None:
    """An undecodable body on the requests' routing key: the worker rejects it into the DLQ."""

    async def publish() -> None:
        connection = await aio_pika.connect(rabbitmq_url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            exchange = await channel.get_exchange("mlp.events")
            message = aio_pika.Message(b"not an event", delivery_mode=aio_pika.DeliveryMode.PERSISTENT)
            await exchange.publish(message, routing_key="inference.requested.basic-model.poison", mandatory=True)
        finally:
            await connection.close()

    asyncio.run(publish())


def _rabbitmq_exporter(namespace: Namespace) -> str:
    url = os.environ.get(RABBITMQ_EXPORTER_VARIABLE) or f"http://{urlsplit(namespace.rabbitmq_url).hostname}:15692"
    try:
        httpx.get(f"{url}/metrics/detailed?family=queue_consumer_count", timeout=5).raise_for_status()
    except httpx.HTTPError as exc:
        pytest.fail(
            f"RabbitMQ's Prometheus plugin does not answer at {url} ({exc}): scripts/ensure-monitoring enables"
            f" rabbitmq_prometheus (or set {RABBITMQ_EXPORTER_VARIABLE})",
            pytrace=False,
        )
    return urlsplit(url).netloc


def _jobs(platform: Platform, triton: TritonProcess, namespace: Namespace) -> list[ScrapeJob]:
    env = platform.env
    return [
        ScrapeJob("mlp-gateway", f"127.0.0.1:{env['MLP_GATEWAY_PORT']}"),
        ScrapeJob("mlp-read-api", f"127.0.0.1:{env['MLP_READ_API_PORT']}"),
        ScrapeJob("mlp-collector", f"127.0.0.1:{env['MLP_COLLECTOR_HEALTH_PORT']}"),
        ScrapeJob("mlp-worker-basic-model", f"127.0.0.1:{env['MLP_WORKER_HEALTH_PORT']}"),
        ScrapeJob("mlp-dispatcher", f"127.0.0.1:{env['MLP_DISPATCHER_HEALTH_PORT']}"),
        ScrapeJob("mlp-triton", urlsplit(triton.metrics_url).netloc),
        ScrapeJob(
            "rabbitmq",
            _rabbitmq_exporter(namespace),
            path="/metrics/detailed",
            # this run's vhost only: other runs share the broker
            params={"family": ["queue_coarse_metrics", "queue_consumer_count"], "vhost": [namespace.name]},
        ),
    ]


@pytest.fixture(scope="module")
def load(triton_server: TritonProcess, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Load]:
    extra = {"MLP_MODELS": "basic-model,slow-model", "MLP_TRITON_TIMEOUT_S": "2", "MLP_TRITON_RETRIES": "0"}
    workdir = tmp_path_factory.mktemp("prometheus")
    with (
        isolated_namespace("e2e-prom") as ns,
        running_platform(ns, triton_server.grpc_url, extra_env=extra) as platform,
    ):
        platform.start("dispatcher")  # the webhook metrics the rules and the dashboard read are its
        config = prometheus_config(_jobs(platform, triton_server, ns), [RULES_FILE])
        with running_prometheus(workdir, config) as prometheus:
            started = time.time()
            prometheus.wait_for('count(up{job=~"mlp-.+|rabbitmq"} == 1) == 7', "every target up")
            # The warm-up creates the outcome series; rate() counts from their first sample on.
            warm_up = _run(platform, 1, 1)
            # every series the checks count from, scraped with its warm-up value (the gateway's and the worker's)
            for expr in ('sum(mlp_outcomes_total{status="failed"}) == 1', "sum(mlp_requests_accepted_total) == 2"):
                prometheus.wait_for(expr, "the warm-up scraped")
            views = _run(platform, N, K)
            assert [v["status"] for v in views] == ["completed"] * N + ["failed"] * K, views
            assert {v["error"]["code"] for v in views[N:]} == {"triton_timeout"}
            # a refusal at the gateway (its reasons' series), and a dead letter
            bad = {"prompt": "x", "user_id": USER, "model": "no-such-model"}
            assert httpx.post(f"{platform.gateway_url}/api/v1/inference", json=bad, timeout=10).status_code == 422
            _dead_letter_a_poison_message(ns.rabbitmq_url)
            prometheus.wait_for(f"sum(mlp_outcomes_total) == {N + K + 2}", "the load's outcomes scraped")
            # ... and evaluated by the recording rules (every second), the gateway's and Triton's counters too
            time.sleep(3)
            completed = views[:N]
            tokens = sum(int(v["usage"]["total_tokens"]) for v in completed)
            latencies = [_latency(v) for v in completed]
            yield Load(ns, platform, prometheus, tokens, latencies, _latency(warm_up[0]), started)


def _latency(view: dict[str, Any]) -> float:
    return (
        datetime.fromisoformat(view["finished_at"]).timestamp() - datetime.fromisoformat(view["created_at"]).timestamp()
    )


@dataclass(frozen=True)
class RateCheck:
    """What rate() over 5 minutes may answer for counters that lived less than that: the samples'
    increase over 300 s, times rate()'s extrapolation (at most 1.1 sample intervals at each end)."""

    increase: float
    low: float
    high: float


def _rate_bounds(points: list[tuple[float, float]]) -> tuple[float, float]:
    sampled = points[-1][0] - points[0][0]
    interval = sampled / (len(points) - 1)
    grown = points[-1][1] - points[0][1]
    return grown / 300, grown * (sampled + 2.2 * interval) / sampled / 300


def rate_check(prometheus: Prometheus, series: str, recorded: str) -> RateCheck:
    """From the raw samples ``series`` had when the rule recorded ``recorded`` (its sample's timestamp).
    The rule may have run before the newest of them was stored (a scrape is stamped when it starts):
    the bounds hold for the samples with and without it."""
    at = prometheus.value(f"timestamp({recorded})")
    assert at is not None, recorded
    data = prometheus.api("query", query=f"{series}[5m]", time=str(at))
    increase = low = high = 0.0
    for item in data["result"]:
        points = [(float(t), float(v)) for t, v in item["values"]]
        assert len(points) >= 3, item
        increase += points[-1][1] - points[0][1]
        bounds = [_rate_bounds(points), _rate_bounds(points[:-1])]
        low += min(b[0] for b in bounds)
        high += max(b[1] for b in bounds)
    return RateCheck(increase, low, high)


def _recorded(prometheus: Prometheus, expr: str, what: str) -> float:
    """The recorded value once the rule evaluated the final counters (rules run every second)."""
    (labels_value,) = prometheus.wait_for(expr, what, timeout_s=15)
    return labels_value[1]


def test_recording_rules_hold_the_expected_values_after_the_known_load(load: Load) -> None:
    p = load.prometheus
    # The outcome mix: the warm-up made both series; rate() counts the load's N and K from there.
    completed = _recorded(p, 'status:mlp_outcomes:ratio5m{status="completed"}', "the outcome mix")
    assert completed == pytest.approx(N / (N + K), abs=0.02)
    assert p.value('status:mlp_outcomes:ratio5m{status="failed"}') == pytest.approx(K / (N + K), abs=0.02)
    assert p.value("mlp:mlp_outcomes_failed:ratio5m") == pytest.approx(K / (N + K), abs=0.02)
    errors = p.query("status_error_code:mlp_outcomes:rate5m")
    assert [labels for labels, _ in errors] == [
        {"__name__": "status_error_code:mlp_outcomes:rate5m", "status": "failed", "error_code": "triton_timeout"}
    ]
    # Rates over a 5 minute window of a shorter life: the load's increase / 300 s, extrapolated by rate().
    recorded = 'model:mlp_requests_accepted:rate5m{model="basic-model"}'
    accepted = p.value(recorded)
    check = rate_check(p, 'mlp_requests_accepted_total{model="basic-model"}', recorded)
    assert check.increase == N, check  # counted from the warm-up's first sample on
    assert accepted is not None
    assert check.low <= accepted <= check.high, (accepted, check)
    # its series appeared with the refusal: recorded (as 0: rate() counts from its first sample on)
    p.wait_for('reason:mlp_requests_rejected:rate5m{reason="unknown_model"}', "the refusals recorded")
    recorded = 'model:mlp_tokens_processed:per_minute_rate5m{model="basic-model"}'
    per_minute = p.value(recorded)
    check = rate_check(p, 'mlp_tokens_processed_total{model="basic-model"}', recorded)
    assert check.increase == load.tokens, check
    assert per_minute is not None
    assert check.low * 60 <= per_minute <= check.high * 60, (per_minute, check)
    by_type = {
        labels["type"]: v
        for labels, v in p.query('model_type:mlp_tokens_processed:per_minute_rate5m{model="basic-model"}')
    }
    assert set(by_type) == {"prompt", "completion"}
    assert check.low * 60 <= sum(by_type.values()) <= check.high * 60, (by_type, check)
    # Submit to outcome: the quantiles lie within the buckets of what the requests took. The warm-up's
    # observation is in the first sample of the buckets at and above its latency, which rate() extrapolates
    # a little more than the others: with a handful of requests the top quantiles may reach its bucket.
    quantiles = {
        labels["quantile"]: v
        for labels, v in p.query('model:mlp_request_duration_seconds:quantile_rate5m{model="basic-model"}')
    }
    assert set(quantiles) == {"0.5", "0.95", "0.99"}
    buckets = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
    ceiling = next(b for b in buckets if b >= max(load.latencies_s))
    context = (quantiles, load.latencies_s, load.warm_up_latency_s)
    assert 0 < quantiles["0.5"] <= ceiling, context
    assert quantiles["0.5"] <= quantiles["0.95"] <= quantiles["0.99"], context
    assert quantiles["0.99"] <= next(b for b in buckets if b >= max(*load.latencies_s, load.warm_up_latency_s)), context
    slow = p.value('model:mlp_request_duration_seconds:quantile_rate5m{model="slow-model", quantile="0.5"}')
    assert slow is not None
    assert slow >= 1.0  # the 2 s Triton timeout, plus queueing


def test_projection_queue_and_batch_records(load: Load) -> None:
    p = load.prometheus
    lag = p.value("mlp:mlp_projection_lag_seconds:max")
    assert lag is not None
    assert 0 <= lag < 10
    delay = p.value("mlp:mlp_collector_projection_delay_seconds:p99_rate5m")
    assert delay is not None
    assert 0 < delay < 10
    vhost = load.namespace.name
    # RabbitMQ emits queue stats every few seconds: wait for the drained queues and the dead letter.
    p.wait_for(
        f'sum(queue:rabbitmq_detailed_queue_messages:sum{{vhost="{vhost}", queue=~".+\\\\.dlq"}}) == 2',
        "the dead letters counted",
    )
    depths = {
        labels["queue"]: v for labels, v in p.query(f'queue:rabbitmq_detailed_queue_messages:sum{{vhost="{vhost}"}}')
    }
    assert depths == {
        "mlp.projections": 0,
        "mlp.requests.basic-model": 0,
        "mlp.requests.slow-model": 0,
        "mlp.projections.dlq": 1,  # the poison message reached the collector too (binding inference.#)
        "mlp.requests.basic-model.dlq": 1,
        "mlp.requests.slow-model.dlq": 0,
        "mlp.webhooks": 0,  # bound only to the keys of users with webhooks: none here
        "mlp.webhooks.dlq": 0,
    }
    consumers = {
        labels["queue"]: v for labels, v in p.query(f'queue:rabbitmq_detailed_queue_consumers:sum{{vhost="{vhost}"}}')
    }
    assert {q: consumers[q] for q in ("mlp.projections", "mlp.requests.basic-model", "mlp.requests.slow-model")} == {
        "mlp.projections": 1,
        "mlp.requests.basic-model": 1,
        "mlp.requests.slow-model": 1,
    }
    # The alert on it goes pending (it fires after its `for: 1m`).
    alert = 'ALERTS{alertname="MlpDeadLetterQueueNotEmpty", alertstate="pending"}'
    p.wait_for(f"count({alert}) == 2", "the alert pending for both DLQs")
    pending = p.query(alert)
    assert {labels["queue"] for labels, _ in pending} == {"mlp.requests.basic-model.dlq", "mlp.projections.dlq"}
    sent = p.value('model:mlp_batch_size:mean_rate5m{model="basic-model"}')
    executed = p.value('model:nv_inference_batch_size:mean_rate5m{model="basic-model"}')
    assert sent is not None
    assert executed is not None
    assert sent >= 1
    assert executed >= 1


def test_every_metric_the_rules_and_the_dashboard_read_exists(load: Load) -> None:
    p = load.prometheus
    recorded = recorded_names()
    for name in recorded:  # every recording rule had its inputs
        p.wait_for(f'count({{__name__="{name}"}})', f"a series of {name}", timeout_s=15)
    names = p.metric_names()
    assert EXTERNAL_METRICS - names == set(), "the documented inputs of Triton, RabbitMQ and Prometheus"
    used = {n for rule in load_rules() for n in metric_names(str(rule["expr"]))}
    used |= {n for _, target in prometheus_targets(load_dashboard()) for n in metric_names(target["expr"])}
    assert used - recorded - names == set()


def test_every_dashboard_query_answers(load: Load) -> None:
    """Each Prometheus panel's query returns series now (the load made them), and the Postgres panel's
    SQL runs on the read models and names the load's user."""
    p = load.prometheus
    empty = [
        f"{panel['title']}: {target['expr']}"
        for panel, target in prometheus_targets(load_dashboard())
        if not p.query(target["expr"])
    ]
    assert empty == []
    panels = dashboard_panels(load_dashboard())
    sql = [t["rawSql"] for panel in panels for t in panel.get("targets", []) if "rawSql" in t]

    async def top_users() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(load.namespace.postgres_dsn)
        try:
            return list(await conn.fetch(sql[0]))
        finally:
            await conn.close()

    rows = asyncio.run(top_users())
    assert [(r["user_id"], r["model"]) for r in rows] == [(USER, "basic-model")]
    assert rows[0]["tokens"] >= load.tokens


def test_bus_metrics_carry_no_user_id(load: Load) -> None:
    destinations = {
        labels.get("destination", "")
        for labels, _ in load.prometheus.query("count by (destination) (faststream_published_messages_total)")
    }
    handlers = {
        labels.get("handler", "")
        for labels, _ in load.prometheus.query("count by (handler) (faststream_received_messages_total)")
    }
    assert "mlp.events.inference.completed" in destinations
    assert "mlp.events.inference.requested" in handlers
    assert not [d for d in destinations | handlers if USER in d or "poison" in d]


def test_keda_queries_in_k8s_answer_numbers(load: Load) -> None:
    """The metrics-api trigger's URL (path and query, against this run's read API) answers a number at
    its valueLocation; every rabbitmq trigger's queue has a depth in RabbitMQ's exporter."""
    scaled = [
        doc
        for path in sorted((REPO / "k8s" / "base").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "ScaledObject"
    ]
    metrics_api = [t for s in scaled for t in s["spec"]["triggers"] if t["type"] == "metrics-api"]
    assert metrics_api
    for trigger in metrics_api:
        url = urlsplit(trigger["metadata"]["url"])
        response = httpx.get(f"{load.platform.api_url}{url.path}?{url.query}", timeout=10)
        assert response.status_code == 200, response.text
        value = response.json()[trigger["metadata"]["valueLocation"]]
        assert isinstance(value, int | float)
        assert value >= 0
    queues = {t["metadata"]["queueName"] for s in scaled for t in s["spec"]["triggers"] if t["type"] == "rabbitmq"}
    # One worker (and trigger) per deployed model of the registry, plus the collector's and the dispatcher's.
    assert queues == {PROJECTIONS_QUEUE, WEBHOOKS_QUEUE, *(requests_queue(m).name for m in QUICKSTART_MODELS)}
    vhost = load.namespace.name
    served = {
        PROJECTIONS_QUEUE,
        WEBHOOKS_QUEUE,
        *(requests_queue(m).name for m in Settings(environment="test").models),
    }
    for queue in sorted(queues & served):  # only this run's queues exist in its vhost
        depth = load.prometheus.value(f'rabbitmq_detailed_queue_messages{{vhost="{vhost}", queue="{queue}"}}')
        assert depth is not None, queue


def test_the_books_of_the_run_reconcile(load: Load) -> None:
    settings = Settings(
        environment="test",
        rabbitmq_url=load.namespace.rabbitmq_url,
        postgres_dsn=load.namespace.postgres_dsn,
        redis_url=load.namespace.redis_url,
        redis_prefix=load.namespace.redis_prefix,
    )
    out = io.StringIO()
    assert reconcile.main(["--settle", "1", "--json"], out=out, settings=settings) == 0, out.getvalue()
    report = json.loads(out.getvalue())
    assert report["drift"] == []
    assert report["requests"] == N + K + 2

"""The manifests agree with the code: queue names from events/topology.py, one worker Deployment per
served model, settings names and ports from mlp.settings (the seed's queue names disagreed between
files; this is the test that keeps ours from drifting)."""

from __future__ import annotations

from urllib.parse import urlsplit

import pytest

from events.topology import (
    PROJECTIONS_QUEUE,
    WEBHOOKS_QUEUE,
    all_queues,
    projections_queue,
    requests_queue,
    webhooks_queue,
)
from mlp.settings import Settings
from tests.k8s.manifests import REPO, Manifest, Rendered, env_value, ident, namespace_of

pytestmark = pytest.mark.k8s

TOKEN_RATE_PATH = "/api/v1/metrics/token-rate"


def _config(rendered: Rendered) -> dict[str, str]:
    maps = [m for m in rendered.of_kind("ConfigMap") if m["metadata"]["name"].startswith("mlp-config")]
    assert len(maps) == 1, [ident(m) for m in maps]
    data: dict[str, str] = maps[0]["data"]
    return data


def _models(rendered: Rendered) -> tuple[str, ...]:
    # The settings' own parsing of the comma-separated list.
    models: tuple[str, ...] = Settings.model_validate({"models": _config(rendered)["MLP_MODELS"]}).models
    assert models
    return models


def _trigger(scaled: Manifest, kind: str) -> Manifest:
    found = [t for t in scaled["spec"]["triggers"] if t["type"] == kind]
    assert len(found) == 1, f"{ident(scaled)}: {len(found)} {kind} triggers"
    trigger: Manifest = found[0]
    return trigger


def _scaled_object_of(rendered: Rendered, deployment: str) -> Manifest:
    found = [s for s in rendered.of_kind("ScaledObject") if s["spec"]["scaleTargetRef"]["name"] == deployment]
    assert len(found) == 1, f"{deployment}: {len(found)} ScaledObjects"
    return found[0]


def test_each_served_model_has_its_worker_deployment(overlay: Rendered) -> None:
    for model in _models(overlay):
        deployment = overlay.one("Deployment", f"mlp-worker-{model}")
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["worker"]
        assert env_value(container, "MLP_MODELS") == model


def test_no_worker_deployment_serves_an_unlisted_model(overlay: Rendered) -> None:
    models = set(_models(overlay))
    workers = [d for d in overlay.of_kind("Deployment") if d["metadata"]["name"].startswith("mlp-worker-")]
    for deployment in workers:
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert env_value(container, "MLP_MODELS") in models, ident(deployment)


def test_worker_scales_on_its_models_request_queue(overlay: Rendered) -> None:
    for model in _models(overlay):
        scaled = _scaled_object_of(overlay, f"mlp-worker-{model}")
        rabbitmq = _trigger(scaled, "rabbitmq")
        assert rabbitmq["metadata"]["queueName"] == requests_queue(model).name
        # http: the management API's count includes unacknowledged (in-flight) messages.
        assert rabbitmq["metadata"]["protocol"] == "http"
        assert rabbitmq["metadata"].get("excludeUnacknowledged", "false") == "false"
        assert rabbitmq["metadata"]["mode"] == "QueueLength"
        assert rabbitmq["authenticationRef"]["name"]
        _trigger(scaled, "cpu")


def test_collector_scales_on_the_projections_queue(overlay: Rendered) -> None:
    scaled = _scaled_object_of(overlay, "mlp-collector")
    rabbitmq = _trigger(scaled, "rabbitmq")
    assert rabbitmq["metadata"]["queueName"] == projections_queue().name == PROJECTIONS_QUEUE
    assert rabbitmq["metadata"]["protocol"] == "http"
    assert scaled["spec"]["minReplicaCount"] >= 1  # projections never stop


def test_dispatcher_scales_on_the_webhooks_queue(overlay: Rendered) -> None:
    scaled = _scaled_object_of(overlay, "mlp-dispatcher")
    rabbitmq = _trigger(scaled, "rabbitmq")
    assert rabbitmq["metadata"]["queueName"] == webhooks_queue().name == WEBHOOKS_QUEUE
    assert rabbitmq["metadata"]["protocol"] == "http"
    assert scaled["spec"]["minReplicaCount"] >= 1  # retries come due from Postgres, not from the queue
    assert _container_ports(overlay, "mlp-dispatcher") == {Settings.model_validate({}).dispatcher_health_port}


def test_every_scaled_queue_is_a_work_queue_of_the_topology(overlay: Rendered) -> None:
    queues = all_queues(_models(overlay))
    work_queues = {q.name for q in queues if q.dead_letter_queue is not None}
    scaled_on = {
        t["metadata"]["queueName"]
        for s in overlay.of_kind("ScaledObject")
        for t in s["spec"]["triggers"]
        if t["type"] == "rabbitmq"
    }
    assert scaled_on == work_queues


def test_worker_token_rate_trigger_points_at_the_read_api(overlay: Rendered) -> None:
    read_api = overlay.one("Service", "mlp-read-api")
    (port,) = read_api["spec"]["ports"]
    for model in _models(overlay):
        metrics_api = _trigger(_scaled_object_of(overlay, f"mlp-worker-{model}"), "metrics-api")
        url = urlsplit(metrics_api["metadata"]["url"])
        # KEDA's operator runs in its own namespace: the host must name the read API's namespace.
        assert url.hostname in (
            f"mlp-read-api.{namespace_of(read_api)}.svc.cluster.local",
            f"mlp-read-api.{namespace_of(read_api)}.svc",
        )
        assert url.port == port["port"]
        assert url.path == TOKEN_RATE_PATH
        assert metrics_api["metadata"]["valueLocation"] == "tokens_per_minute"


def test_config_map_holds_only_known_settings(overlay: Rendered) -> None:
    """A misspelt MLP_ variable would be ignored silently (extra="ignore"): catch it here."""
    fields = {f"MLP_{name.upper()}" for name in Settings.model_fields}
    unknown = [key for key in _config(overlay) if key.startswith("MLP_") and key not in fields]
    assert not unknown
    assert all(key.startswith(("MLP_", "OTEL_")) for key in _config(overlay))
    # Outside development the settings refuse placeholder credentials (fail fast).
    assert _config(overlay)["MLP_ENVIRONMENT"] == "production"


def _container_ports(rendered: Rendered, deployment: str) -> set[int]:
    (container,) = rendered.one("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
    return {p["containerPort"] for p in container.get("ports", [])}


def test_ports_match_the_settings(overlay: Rendered) -> None:
    defaults = Settings.model_validate({})  # the defaults, whatever this shell exports
    assert _container_ports(overlay, "mlp-gateway") == {defaults.gateway_port}
    assert _container_ports(overlay, "mlp-read-api") == {defaults.read_api_port}
    assert _container_ports(overlay, "mlp-collector") == {defaults.collector_health_port}
    for model in _models(overlay):
        assert _container_ports(overlay, f"mlp-worker-{model}") == {defaults.worker_health_port}
    # Services listen on all interfaces inside the pod (the settings default to loopback).
    config = _config(overlay)
    for key in ("MLP_GATEWAY_HOST", "MLP_READ_API_HOST", "MLP_HEALTH_HOST"):
        assert config[key] == "0.0.0.0"


def test_triton_url_names_the_triton_grpc_service(overlay: Rendered) -> None:
    host, _, port = _config(overlay)["MLP_TRITON_URL"].rpartition(":")
    service = overlay.one("Service", host)
    grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
    assert [p["port"] for p in grpc] == [int(port)]
    assert _container_ports(overlay, host) == {8000, 8001, 8002}


def test_triton_loads_exactly_the_served_models(overlay: Rendered) -> None:
    (container,) = overlay.one("Deployment", "mlp-triton")["spec"]["template"]["spec"]["containers"]
    assert "--model-control-mode=explicit" in container["args"]
    loaded = {a.removeprefix("--load-model=") for a in container["args"] if a.startswith("--load-model=")}
    assert loaded == set(_models(overlay))
    for model in loaded:
        config = REPO / "triton_models" / model / "config.pbtxt"
        assert config.is_file(), f"{model}: not in triton_models/"
        assert f'name: "{model}"' in config.read_text(encoding="utf-8")

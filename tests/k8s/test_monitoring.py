"""k8s/monitoring: the Prometheus Operator objects are valid, every platform Service is scraped by exactly
one ServiceMonitor on a port it has, and the dashboard ConfigMap follows the Grafana sidecar convention."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.k8s.manifests import (
    K8S_DIR,
    SCHEMA_DIR,
    Manifest,
    Rendered,
    closed_schema,
    ident,
    namespace_of,
    pod_template,
    render,
    selector_matches,
)

pytestmark = pytest.mark.k8s

# component label -> Services of that component are platform services with /metrics
SCRAPED_COMPONENTS = ("gateway", "read-api", "collector", "dispatcher", "worker", "triton")


def _validators() -> dict[str, jsonschema.Draft202012Validator]:
    schemas = yaml.safe_load((SCHEMA_DIR / "monitoring.coreos.com.yaml").read_text(encoding="utf-8"))["kinds"]
    return {kind: jsonschema.Draft202012Validator(closed_schema(schema)) for kind, schema in schemas.items()}


VALIDATORS = _validators()


def _errors(obj: Manifest) -> list[str]:
    errors = VALIDATORS[obj["kind"]].iter_errors(obj)
    return [f"{ident(obj)}: {'.'.join(str(p) for p in e.path)}: {e.message}" for e in errors]


@pytest.fixture(scope="module")
def monitoring(k8s_tree: Path) -> Rendered:
    """Rendered on its own: it is applied on its own, after the platform (no Namespace of its own, and
    objects of CRDs that only a cluster with the Prometheus Operator knows)."""
    rendered = Rendered("monitoring", render(k8s_tree / "monitoring"))
    assert {namespace_of(o) for o in rendered.objects} == {"mlp"}
    return rendered


@pytest.fixture(scope="module")
def platform(rendered_all: dict[str, Rendered]) -> Rendered:
    """The kind overlay: the platform's Services and the in-cluster RabbitMQ the monitors point at."""
    return rendered_all["overlays/kind"]


def test_monitoring_objects_validate_against_their_schemas(monitoring: Rendered) -> None:
    objects = monitoring.of_kind(*VALIDATORS)
    assert {o["kind"] for o in objects} == set(VALIDATORS)
    errors = [message for obj in objects for message in _errors(obj)]
    assert not errors, "\n".join(errors)


def test_the_schemas_reject_a_misspelt_field(monitoring: Rendered) -> None:
    rule = copy.deepcopy(monitoring.one("PrometheusRule", "mlp-platform"))
    rule["spec"]["groups"][1]["rules"][0]["annotation"] = {"summary": "x"}
    assert _errors(rule)
    monitor = copy.deepcopy(monitoring.one("ServiceMonitor", "mlp-triton"))
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"
    assert _errors(monitor)


def _selected_services(monitor: Manifest, services: list[Manifest]) -> list[Manifest]:
    spec = monitor["spec"]
    names = spec.get("namespaceSelector", {}).get("matchNames") or [namespace_of(monitor)]
    return [
        s
        for s in services
        if namespace_of(s) in names and selector_matches(spec["selector"], s["metadata"].get("labels", {}))
    ]


def test_every_platform_service_is_scraped_by_exactly_one_monitor_on_a_port_it_has(
    monitoring: Rendered, platform: Rendered
) -> None:
    services = platform.of_kind("Service")
    scraped: dict[str, list[str]] = {}
    for monitor in monitoring.of_kind("ServiceMonitor"):
        selected = _selected_services(monitor, services)
        assert selected, f"{ident(monitor)} selects no Service"
        for service in selected:
            ports = {p.get("name") for p in service["spec"]["ports"]}
            for endpoint in monitor["spec"]["endpoints"]:
                assert endpoint["port"] in ports, f"{ident(monitor)} -> {ident(service)}: no port {endpoint['port']}"
            scraped.setdefault(ident(service), []).append(monitor["metadata"]["name"])
    platform_services = [
        ident(s)
        for s in services
        if s["metadata"].get("labels", {}).get("app.kubernetes.io/component") in SCRAPED_COMPONENTS
    ]
    assert platform_services
    assert {s: len(scraped.get(s, [])) for s in platform_services} == dict.fromkeys(platform_services, 1)
    assert "Service/mlp-data/mlp-rabbitmq-metrics" in scraped  # the queues' exporter


def test_monitors_scrape_the_port_the_pods_announce(monitoring: Rendered, platform: Rendered) -> None:
    """The prometheus.io/* annotations (for a Prometheus without the operator) and the monitors agree."""
    workloads = [o for o in platform.objects if pod_template(o) is not None]
    for monitor in monitoring.of_kind("ServiceMonitor"):
        for service in _selected_services(monitor, platform.of_kind("Service")):
            ports = {p["name"]: p for p in service["spec"]["ports"]}
            for workload in workloads:
                template = pod_template(workload)
                assert template is not None
                if namespace_of(workload) != namespace_of(service) or not selector_matches(
                    {"matchLabels": service["spec"]["selector"]}, template["metadata"]["labels"]
                ):
                    continue
                annotations: dict[str, Any] = template["metadata"].get("annotations", {})
                if "prometheus.io/port" not in annotations:
                    continue  # RabbitMQ's pods: scraped through the monitor only
                endpoint = monitor["spec"]["endpoints"][0]
                assert annotations["prometheus.io/scrape"] == "true", ident(workload)
                assert int(annotations["prometheus.io/port"]) == ports[endpoint["port"]]["port"], ident(workload)
                assert annotations["prometheus.io/path"] == endpoint["path"], ident(workload)


def test_the_prometheus_rule_holds_the_plain_rules_files_groups(monitoring: Rendered) -> None:
    plain = yaml.safe_load((K8S_DIR / "monitoring" / "rules.yaml").read_text(encoding="utf-8"))
    assert monitoring.one("PrometheusRule", "mlp-platform")["spec"]["groups"] == plain["groups"]


def test_the_dashboard_config_map_follows_the_grafana_sidecar_convention(monitoring: Rendered) -> None:
    config = monitoring.one("ConfigMap", "mlp-grafana-dashboards")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = (K8S_DIR / "monitoring" / "dashboards" / "mlp-platform.json").read_text(encoding="utf-8")
    assert config["data"] == {"mlp-platform.json": committed}
    assert json.loads(config["data"]["mlp-platform.json"])["uid"] == "mlp-platform"

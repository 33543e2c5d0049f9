"""Helpers of the monitoring tests: promtool, the metric names a PromQL expression reads, and the metric
names that exist (defined by the platform's code, or documented inputs from Triton, RabbitMQ, Prometheus)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
MONITORING_DIR = REPO / "k8s" / "monitoring"
RULES_FILE = MONITORING_DIR / "rules.yaml"
DASHBOARD_FILE = MONITORING_DIR / "dashboards" / "mlp-platform.json"
OPERATIONS_DOC = REPO / "docs" / "operations.md"
RUNBOOK_BASE: Final = "https://github.com/example-org/inference-platform/blob/main/docs/operations.md#"
INSTALL_HINT: Final = "install Prometheus's tools: scripts/ensure-monitoring (apt-get install prometheus)"

# Inputs the platform does not define: Triton's metrics port, RabbitMQ's rabbitmq_prometheus plugin
# (/metrics/detailed), Prometheus's own `up`. The e2e test (tests/e2e/test_prometheus.py) finds each
# of them on the live endpoints, so this list cannot drift from what those exporters serve.
EXTERNAL_METRICS: Final = frozenset(
    {
        "up",
        "nv_inference_count",
        "nv_inference_exec_count",
        "nv_inference_request_success",
        "nv_inference_queue_duration_us",
        "nv_inference_compute_infer_duration_us",
        "rabbitmq_detailed_queue_messages",
        "rabbitmq_detailed_queue_consumers",
    }
)

_KEYWORDS: Final = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset"}
    | {"inf", "nan"}
)
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![0-9.A-Za-z_:])[A-Za-z_:][A-Za-z0-9_:]*")


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(f"promtool is not installed: {INSTALL_HINT}", pytrace=False)
    return found


def run_promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: identifiers outside strings, label matchers, ranges and
    grouping clauses that are neither function calls nor keywords."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for match in _IDENTIFIER.finditer(text):
        name = match.group(0)
        if name.lower() in _KEYWORDS or text[match.end() :].lstrip().startswith("("):
            continue
        names.add(name)
    return names


def load_rules() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def recorded_names() -> set[str]:
    return {rule["record"] for rule in load_rules() if "record" in rule}


def load_dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return dashboard


def dashboard_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those inside collapsed rows included."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def prometheus_targets(dashboard: dict[str, Any]) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(panel, target) for every Prometheus query of the dashboard."""
    for panel in dashboard_panels(dashboard):
        for target in panel.get("targets", []):
            if target.get("datasource", panel.get("datasource", {})).get("type") == "prometheus":
                yield panel, target


def defined_metric_names() -> set[str]:
    """The sample names of every metric the platform's code defines (its modules register them on import),
    FastStream's bus metrics included."""
    from faststream.prometheus.container import MetricsContainer
    from prometheus_client import REGISTRY, CollectorRegistry

    import ml_worker.metrics  # noqa: F401
    import mlp.metrics  # noqa: F401
    import results_collector.metrics  # noqa: F401
    import webhook_dispatcher.metrics  # noqa: F401

    bus = CollectorRegistry()
    MetricsContainer(bus, metrics_prefix="faststream", custom_label_names=())
    return set(_sample_names(f for registry in (REGISTRY, bus) for f in registry.collect()))


def _sample_names(families: Iterable[Any]) -> Iterator[str]:
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
    }
    for family in families:
        for suffix in suffixes.get(family.type, ("",)):
            yield family.name + suffix


def rules_file_of(expressions: dict[str, str]) -> str:
    """A rules file recording each expression under its name: promtool checks that every one parses."""
    rules = [{"record": name, "expr": expr} for name, expr in expressions.items()]
    return yaml.safe_dump({"groups": [{"name": "parse-check", "rules": rules}]}, sort_keys=False)


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def operations_anchors() -> set[str]:
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", OPERATIONS_DOC.read_text(encoding="utf-8"), flags=re.MULTILINE)
    return {github_anchor(h) for h in headings}

"""The Grafana dashboard (k8s/monitoring/dashboards/mlp-platform.json), validated structurally: a sound
layout, datasources from its variables, every Prometheus query parses with promtool and reads metrics that
exist, and it covers what operators look at. No query groups by user (no per-user label exists)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.monitoring.promql import (
    EXTERNAL_METRICS,
    dashboard_panels,
    defined_metric_names,
    load_dashboard,
    metric_names,
    prometheus_targets,
    recorded_names,
    rules_file_of,
    run_promtool,
)

pytestmark = pytest.mark.monitoring

GRID_COLUMNS = 24
# what the dashboard must show -> a metric one of its panels reads
COVERAGE = {
    "traffic": "model:mlp_requests_accepted:rate5m",
    "latency": "model:mlp_request_duration_seconds:quantile_rate5m",
    "outcomes": "status:mlp_outcomes:ratio5m",
    "tokens by model": "model_type:mlp_tokens_processed:per_minute_rate5m",
    "queue depths": "queue:rabbitmq_detailed_queue_messages:sum",
    "projection lag": "mlp:mlp_projection_lag_seconds:max",
    "Triton batch sizes": "model:nv_inference_batch_size:mean_rate5m",
}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return load_dashboard()


def _cells(panel: dict[str, Any]) -> set[tuple[int, int]]:
    grid = panel["gridPos"]
    return {(x, y) for x in range(grid["x"], grid["x"] + grid["w"]) for y in range(grid["y"], grid["y"] + grid["h"])}


def test_the_layout_is_sound(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "mlp-platform"
    assert dashboard["title"]
    assert isinstance(dashboard["schemaVersion"], int)
    panels = list(dashboard_panels(dashboard))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    taken: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert min(grid["w"], grid["h"]) > 0, panel
        assert 0 <= grid["x"] <= grid["x"] + grid["w"] <= GRID_COLUMNS, panel
        cells = _cells(panel)
        assert not cells & taken, f"panel {panel['id']} overlaps another"
        taken |= cells
        assert panel["title"], panel["id"]
        if panel["type"] != "row":
            assert panel["targets"], f"panel {panel['title']!r} has no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


def test_datasources_come_from_the_dashboards_variables(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v["query"] for v in dashboard["templating"]["list"] if v["type"] == "datasource"}
    for panel in dashboard_panels(dashboard):
        for source in [panel.get("datasource"), *(t.get("datasource") for t in panel.get("targets", []))]:
            if source is None:
                continue
            uid = source["uid"]
            variable = re.fullmatch(r"\$\{(\w+)\}", uid)
            assert variable, f"{panel['title']}: a fixed datasource uid"
            assert variables[variable.group(1)] == source["type"], panel["title"]


def test_every_prometheus_query_parses(dashboard: dict[str, Any], tmp_path: Path) -> None:
    queries = {f"dashboard:panel_{p['id']}_{t['refId']}": t["expr"] for p, t in prometheus_targets(dashboard)}
    assert len(queries) > 20
    assert not [q for q in queries.values() if "$" in q], "Grafana variables would not parse; use none"
    rules = tmp_path / "dashboard-queries.yaml"
    rules.write_text(rules_file_of(queries), encoding="utf-8")
    result = run_promtool("check", "rules", str(rules))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries)} rules found" in result.stdout


def test_every_query_reads_metrics_that_exist(dashboard: dict[str, Any]) -> None:
    known = defined_metric_names() | EXTERNAL_METRICS | recorded_names()
    for panel, target in prometheus_targets(dashboard):
        names = metric_names(target["expr"])
        assert names, f"{panel['title']}: {target['expr']} reads no metric"
        assert names <= known, f"{panel['title']}: unknown {names - known}"


def test_it_covers_what_operators_look_at(dashboard: dict[str, Any]) -> None:
    used = {name for _, target in prometheus_targets(dashboard) for name in metric_names(target["expr"])}
    assert {topic: metric in used for topic, metric in COVERAGE.items()} == dict.fromkeys(COVERAGE, True)
    # DLQs and the batch sizes the workers sent: their own queries
    exprs = [t["expr"] for _, t in prometheus_targets(dashboard)]
    assert any(re.search(r'queue=~"\.\+\\\\\.dlq"', e) for e in exprs)
    assert "model:mlp_batch_size:mean_rate5m" in used


def test_tokens_by_user_come_from_the_ledger_not_from_a_metric_label(dashboard: dict[str, Any]) -> None:
    sql = [t["rawSql"] for p in dashboard_panels(dashboard) for t in p.get("targets", []) if "rawSql" in t]
    assert any("token_usage_daily" in q and "user_id" in q for q in sql)
    for panel, target in prometheus_targets(dashboard):
        assert "user" not in target["expr"], f"{panel['title']}: per-user series would be unbounded"

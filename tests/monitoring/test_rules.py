"""The Prometheus rules (k8s/monitoring/rules.yaml) on promtool: they load, every alert is unit-tested with
series that fire it and series that must not, has a runbook section, and reads only metrics that exist."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from ops import monitoring
from tests.monitoring.promql import (
    EXTERNAL_METRICS,
    MONITORING_DIR,
    RULES_FILE,
    RUNBOOK_BASE,
    defined_metric_names,
    load_rules,
    metric_names,
    operations_anchors,
    recorded_names,
    run_promtool,
)

pytestmark = pytest.mark.monitoring

UNIT_TESTS = Path(__file__).with_name("rules.test.yaml")
ALERTS = sorted(rule["alert"] for rule in load_rules() if "alert" in rule)


def test_promtool_accepts_the_rules_file() -> None:
    result = run_promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(load_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    result = run_promtool("test", "rules", UNIT_TESTS.name, cwd=UNIT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    cases: dict[str, set[bool]] = defaultdict(set)
    for test in yaml.safe_load(UNIT_TESTS.read_text(encoding="utf-8"))["tests"]:
        for case in test.get("alert_rule_test", []):
            cases[case["alertname"]].add(bool(case.get("exp_alerts")))
    assert {alert: cases[alert] for alert in ALERTS} == {alert: {True, False} for alert in ALERTS}
    assert set(cases) <= set(ALERTS), "a unit test names an alert that does not exist"


@pytest.mark.parametrize("alert", ALERTS)
def test_every_alert_has_a_severity_a_text_and_a_runbook_section(alert: str) -> None:
    rule = next(r for r in load_rules() if r.get("alert") == alert)
    assert rule["labels"]["severity"] in ("warning", "critical")
    annotations = rule["annotations"]
    assert annotations["summary"]
    assert annotations["description"]
    url: str = annotations["runbook_url"]
    assert url.startswith(RUNBOOK_BASE)
    anchor = url.removeprefix(RUNBOOK_BASE)
    assert anchor == alert.lower()
    assert anchor in operations_anchors(), f"docs/operations.md has no section `{alert}`"


def test_the_rules_read_only_metrics_that_exist() -> None:
    known = defined_metric_names() | EXTERNAL_METRICS | recorded_names()
    used = {name for rule in load_rules() for name in metric_names(str(rule["expr"]))}
    assert used - known == set()
    # the metrics added for these rules are read by them
    assert {"mlp_request_duration_seconds_bucket", "mlp_quota_rebuilds_total", "mlp_quota_rebuild_in_progress"} <= used


def test_the_prometheus_rule_is_generated_from_the_rules_file() -> None:
    out = MONITORING_DIR / "prometheus-rule.yaml"
    assert monitoring.main(["check", "--rules", str(RULES_FILE), "--out", str(out)]) == 0
    generated = yaml.safe_load(monitoring.render(RULES_FILE.read_text(encoding="utf-8")))
    assert generated["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text(encoding="utf-8"))["groups"]


def test_the_check_reports_a_stale_prometheus_rule(tmp_path: Path) -> None:
    stale = tmp_path / "prometheus-rule.yaml"
    stale.write_text(monitoring.render(RULES_FILE.read_text(encoding="utf-8")).replace("for: 2m", "for: 3m", 1))
    assert monitoring.main(["check", "--rules", str(RULES_FILE), "--out", str(stale)]) == 1
    assert monitoring.main(["generate", "--rules", str(RULES_FILE), "--out", str(stale)]) == 0
    assert monitoring.main(["check", "--rules", str(RULES_FILE), "--out", str(stale)]) == 0


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (model, le) (rate(mlp_x_bucket{a="b", c=~"d.+"}[5m]))', {"mlp_x_bucket"}),
        ("a:b:c / ignoring (status) group_left () sum(a:b:c) * 60", {"a:b:c"}),
        ('up{job="x"} == 0 or absent(up{job="y"}) and on () vector(0) == 1e3', {"up"}),
        ("histogram_quantile(0.99, rate(m[5m] offset 1h)) > bool 2", {"m"}),
    ],
)
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names

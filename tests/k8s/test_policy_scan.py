"""The third-party policy scan (checkov) over the rendered overlays, and its checked-in skip list.

The scan itself needs checkov, which `make policy-scan` installs into a virtualenv of its own (CI runs
it there, .ci/run); without it that one test is skipped, the skip list's own rules still run.
"""

from __future__ import annotations

import re

import pytest

from tests.k8s.manifests import OVERLAYS, Rendered, ident, namespace_of
from tests.k8s.policy_scan import (
    Finding,
    OverlayResult,
    Skip,
    find_checkov,
    judge,
    load_skips,
    overlay_name,
    report_lines,
    scan,
)

pytestmark = pytest.mark.k8s

GATEWAY = "Deployment.mlp.mlp-gateway"
DIGEST = "CKV_K8S_43"


def _skip(overlays: tuple[str, ...] = ("kind",), resources: tuple[str, ...] = (GATEWAY,)) -> Skip:
    return Skip(check=DIGEST, overlays=overlays, resources=resources, reason="built locally")


def test_a_failed_check_is_accepted_only_by_an_entry_naming_its_check_overlay_and_resource() -> None:
    kind = Finding("kind", DIGEST, GATEWAY)
    production = Finding("production", DIGEST, GATEWAY)
    other_check = Finding("kind", "CKV_K8S_15", GATEWAY)
    other_resource = Finding("kind", DIGEST, "Job.mlp.mlp-migrate")
    results = [
        OverlayResult("kind", passed=10, failed=[kind, other_check, other_resource]),
        OverlayResult("production", passed=10, failed=[production]),
    ]
    verdict = judge(results, [_skip()])
    assert [finding for finding, _ in verdict.accepted] == [kind]
    assert verdict.unexplained == sorted([other_check, other_resource, production])
    assert not verdict.ok


def test_an_entry_whose_finding_is_gone_is_stale() -> None:
    verdict = judge([OverlayResult("kind", passed=1, failed=[])], [_skip(overlays=("kind", "production"))])
    assert verdict.stale == [Finding("kind", DIGEST, GATEWAY), Finding("production", DIGEST, GATEWAY)]
    assert not verdict.ok
    assert any("stale" in line for line in report_lines([OverlayResult("kind", 1, [])], verdict))


def test_every_finding_covered_and_every_entry_used_is_a_pass() -> None:
    finding = Finding("kind", DIGEST, GATEWAY)
    results = [OverlayResult("kind", passed=5, failed=[finding])]
    verdict = judge(results, [_skip()])
    assert verdict.ok
    assert report_lines(results, verdict)[0].startswith("checkov kind: 5 passed, 1 failed (1 accepted")


def test_every_skip_names_rendered_resources_and_gives_a_reason(rendered_all: dict[str, Rendered]) -> None:
    """Typos fail here even without checkov: each resource must exist in each overlay it names."""
    skips = load_skips()
    assert skips
    overlays = {overlay_name(k): rendered_all[k] for k in OVERLAYS}
    for skip in skips:
        assert re.fullmatch(r"CKV_K8S_\d+", skip.check), skip.check
        assert len(skip.reason) >= 80, f"{skip.check}: say why, not just that"
        assert set(skip.overlays) <= set(overlays), skip.overlays
        for overlay in skip.overlays:
            present = {f"{o['kind']}.{namespace_of(o)}.{o['metadata']['name']}" for o in overlays[overlay].objects}
            missing = set(skip.resources) - present
            assert not missing, f"{skip.check} in {overlay}: no such resource {missing}"
    # Secrets as environment variables are never accepted: every service reads its Secret as files.
    assert "CKV_K8S_35" not in {skip.check for skip in skips}


def test_the_production_overlay_accepts_nothing_but_the_release_digest(rendered_all: dict[str, Rendered]) -> None:
    production = [skip for skip in load_skips() if "production" in skip.overlays]
    assert {skip.check for skip in production} == {DIGEST}
    for workload in rendered_all["overlays/production"].of_kind("Deployment", "Job"):
        for container in workload["spec"]["template"]["spec"]["containers"]:
            assert container.get("imagePullPolicy") == "Always", ident(workload)


@pytest.mark.skipif(find_checkov() is None, reason="no checkov: `make policy-scan` installs it (.venv-checkov)")
def test_checkov_finds_nothing_beyond_the_skip_list() -> None:
    checkov = find_checkov()
    assert checkov is not None
    results, verdict = scan(checkov)
    assert {result.overlay for result in results} == {overlay_name(k) for k in OVERLAYS}
    assert all(result.passed > 100 for result in results)  # the scan really ran its checks
    assert verdict.ok, "\n".join(report_lines(results, verdict))

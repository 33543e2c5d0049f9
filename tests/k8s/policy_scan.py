"""checkov, a third-party policy scanner, over every rendered overlay; accepted findings come from a
checked-in skip list, each with its reason (k8s/checkov-skips.yaml).

The overlays are rendered as the other k8s tests render them (a clean copy, secret files from their
templates). A failed check that no skip entry covers fails the scan, and so does a skip entry that
matches no failed check: a fixed finding must leave the list. checkov lives in a virtualenv of its own
(``make policy-scan``): its pins would downgrade the project's own dependencies.

    MLP_CHECKOV=.venv-checkov/bin/checkov python -m tests.k8s.policy_scan
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.k8s.manifests import KUBECTL, OVERLAYS, REPO, prepare_tree

SKIPS_FILE = REPO / "k8s" / "checkov-skips.yaml"
CHECKOV_VENV_BIN = REPO / ".venv-checkov" / "bin" / "checkov"


@dataclass(frozen=True, order=True)
class Finding:
    """One check on one rendered resource, e.g. ("kind", "CKV_K8S_43", "Deployment.mlp.mlp-gateway")."""

    overlay: str
    check: str
    resource: str


@dataclass(frozen=True)
class Skip:
    check: str
    overlays: tuple[str, ...]
    resources: tuple[str, ...]
    reason: str

    def covers(self, finding: Finding) -> bool:
        return finding.check == self.check and finding.overlay in self.overlays and finding.resource in self.resources

    def expected(self) -> list[Finding]:
        return [Finding(o, self.check, r) for o in self.overlays for r in self.resources]


@dataclass(frozen=True)
class OverlayResult:
    overlay: str
    passed: int
    failed: list[Finding]


@dataclass(frozen=True)
class Verdict:
    accepted: list[tuple[Finding, Skip]]
    unexplained: list[Finding]
    stale: list[Finding]

    @property
    def ok(self) -> bool:
        return not self.unexplained and not self.stale


def load_skips(path: Path = SKIPS_FILE) -> list[Skip]:
    document: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [
        Skip(
            check=entry["check"],
            overlays=tuple(entry["overlays"]),
            resources=tuple(entry["resources"]),
            reason=" ".join(str(entry["reason"]).split()),
        )
        for entry in document["skips"]
    ]


def judge(results: Iterable[OverlayResult], skips: Sequence[Skip]) -> Verdict:
    """Each failed check is accepted by the skip entry that covers it, or unexplained; each finding a
    skip entry names but checkov did not fail is stale."""
    failed = {finding for result in results for finding in result.failed}
    accepted: list[tuple[Finding, Skip]] = []
    unexplained: list[Finding] = []
    for finding in sorted(failed):
        covering = [skip for skip in skips if skip.covers(finding)]
        if covering:
            accepted.append((finding, covering[0]))
        else:
            unexplained.append(finding)
    stale = sorted({expected for skip in skips for expected in skip.expected()} - failed)
    return Verdict(accepted=accepted, unexplained=unexplained, stale=stale)


def overlay_name(kustomization: str) -> str:
    return kustomization.removeprefix("overlays/")


def render_overlays(destination: Path) -> dict[str, Path]:
    """Every deployable overlay rendered to one YAML file (the files checkov scans)."""
    tree = prepare_tree(destination)
    rendered: dict[str, Path] = {}
    for kustomization in OVERLAYS:
        output = subprocess.run(
            [KUBECTL, "kustomize", str(tree / kustomization)], capture_output=True, text=True, timeout=120, check=True
        ).stdout
        target = destination / f"{overlay_name(kustomization)}.yaml"
        target.write_text(output, encoding="utf-8")
        rendered[overlay_name(kustomization)] = target
    return rendered


def run_checkov(checkov: str, overlay: str, manifest: Path) -> OverlayResult:
    # --skip-download: no call to the vendor's platform (offline here, and nothing of ours is sent).
    completed = subprocess.run(
        [checkov, "--file", str(manifest), "--framework", "kubernetes", "--quiet", "--skip-download", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if completed.returncode not in (0, 1):  # 1: some check failed
        raise RuntimeError(f"checkov failed ({completed.returncode}):\n{completed.stderr[-4000:]}")
    report: dict[str, Any] = json.loads(completed.stdout)
    if report["summary"]["parsing_errors"]:
        raise RuntimeError(f"checkov could not parse {manifest}")
    failed = [Finding(overlay, r["check_id"], r["resource"]) for r in report["results"]["failed_checks"]]
    return OverlayResult(overlay=overlay, passed=int(report["summary"]["passed"]), failed=failed)


def find_checkov() -> str | None:
    configured = os.environ.get("MLP_CHECKOV")
    if configured:
        return configured
    return str(CHECKOV_VENV_BIN) if CHECKOV_VENV_BIN.exists() else None


def scan(checkov: str) -> tuple[list[OverlayResult], Verdict]:
    with tempfile.TemporaryDirectory(prefix="mlp-checkov-") as directory:
        rendered = render_overlays(Path(directory))
        results = [run_checkov(checkov, overlay, manifest) for overlay, manifest in rendered.items()]
    return results, judge(results, load_skips())


def report_lines(results: Sequence[OverlayResult], verdict: Verdict) -> list[str]:
    lines = []
    for result in results:
        accepted = sum(1 for finding, _ in verdict.accepted if finding.overlay == result.overlay)
        unexplained = sum(1 for finding in verdict.unexplained if finding.overlay == result.overlay)
        lines.append(
            f"checkov {result.overlay}: {result.passed} passed, {len(result.failed)} failed"
            f" ({accepted} accepted in {SKIPS_FILE.relative_to(REPO)}, {unexplained} unexplained)"
        )
    lines += [f"  unexplained: {f.overlay} {f.check} {f.resource}" for f in verdict.unexplained]
    lines += [f"  stale skip (no such finding): {f.overlay} {f.check} {f.resource}" for f in verdict.stale]
    return lines


def main() -> int:
    checkov = find_checkov()
    if checkov is None:
        print("policy-scan: no checkov (set MLP_CHECKOV or run `make policy-scan`)", file=sys.stderr)
        return 2
    results, verdict = scan(checkov)
    print("\n".join(report_lines(results, verdict)))
    return 0 if verdict.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Imports point down a floor: operator tools above services, services above contexts, contexts above plumbing.

Every import counts, function-level ones included (they used to dodge the layering), so a new package
must take its place in FLOORS before it can import anything of ours.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_CONTEXTS = {"events", "mlp", "projections", "quota", "ml_service", "tenancy", "webhooks"}
# package -> the first-party packages it may import (besides itself)
FLOORS: dict[str, set[str]] = {
    "events": set(),  # the domain language: imports nothing of ours
    "mlp": {"events"},  # plumbing every service shares
    "projections": {"events", "mlp"},
    "ml_service": {"events", "mlp"},
    "quota": {"events", "mlp", "projections"},  # composes the status cache's Lua fragments
    "tenancy": {"events", "mlp"},
    "webhooks": {"events", "mlp"},  # signed webhooks: the SSRF guard, signing, the store (gateway + dispatcher)
    # services: contexts and plumbing, never another service
    "api_gateway": _CONTEXTS,
    "ml_worker": _CONTEXTS,
    "results_collector": _CONTEXTS,
    "read_api": _CONTEXTS,
    "webhook_dispatcher": _CONTEXTS,
    # the top floor: may import anything; nothing imports it
    "ops": _CONTEXTS | {"api_gateway", "ml_worker", "results_collector", "read_api", "webhook_dispatcher"},
}


def _package_dirs() -> dict[str, Path]:
    dirs = {p.name: p for p in (ROOT / "platform").iterdir() if (p / "__init__.py").is_file()}
    dirs.update({name: ROOT / name for name in ("events", "projections")})
    return dirs


def _first_party_imports(path: Path, packages: set[str]) -> set[tuple[str, int]]:
    found: set[tuple[str, int]] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        else:
            continue
        found |= {(name.split(".")[0], node.lineno) for name in names if name.split(".")[0] in packages}
    return found


def test_every_package_has_a_floor() -> None:
    assert set(_package_dirs()) == set(FLOORS)


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_imports_point_down(package: str) -> None:
    packages = set(FLOORS)
    wrong = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in sorted(_package_dirs()[package].rglob("*.py"))
        for target, line in sorted(_first_party_imports(path, packages))
        if target != package and target not in FLOORS[package]
    ]
    assert wrong == []

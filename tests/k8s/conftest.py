"""Session fixtures of the k8s tests: every kustomization rendered once, from a clean temporary copy."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.k8s.manifests import KUSTOMIZATIONS, OVERLAYS, Rendered, prepare_tree, render


@pytest.fixture(scope="session")
def k8s_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_tree(tmp_path_factory.mktemp("k8s-render"))


@pytest.fixture(scope="session")
def rendered_all(k8s_tree: Path) -> dict[str, Rendered]:
    return {name: Rendered(name, render(k8s_tree / name)) for name in KUSTOMIZATIONS}


@pytest.fixture(scope="session", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest, rendered_all: dict[str, Rendered]) -> Rendered:
    """Each deployable overlay in turn (kind, production)."""
    name: str = request.param
    return rendered_all[name]


@pytest.fixture(scope="session", params=KUSTOMIZATIONS)
def kustomization(request: pytest.FixtureRequest, rendered_all: dict[str, Rendered]) -> Rendered:
    """Every kustomization in turn, base and the kind data services included."""
    name: str = request.param
    return rendered_all[name]

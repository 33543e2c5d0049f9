"""Rendering the kustomize tree offline and walking the rendered objects (helpers of the k8s tests).

The tree is rendered from a temporary copy: a developer's real, git-ignored secret files (``secrets/*.env``,
the kind RabbitMQ definitions) are left out of the copy and recreated there from the committed ``*.example``
templates, so the tests see exactly what a fresh checkout renders and never print a real credential.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S_DIR = REPO / "k8s"
SCHEMA_DIR = Path(__file__).resolve().parent / "schemas"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

# Every kustomization a user applies (kind/data is applied on its own first in the walk-through).
KUSTOMIZATIONS = ("base", "overlays/kind/data", "overlays/kind", "overlays/production")
# The ones that render a complete, deployable platform (their references must all resolve).
OVERLAYS = ("overlays/kind", "overlays/production")

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob")
LONG_RUNNING_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
# Markers of a value that is not a real credential: the same ones mlp.settings refuses outside development.
PLACEHOLDER_MARKERS = ("changeme", "change-me", "placeholder", "<", "${")

Manifest = dict[str, Any]


def _secret_files_and_caches(directory: str, names: list[str]) -> set[str]:
    """copytree's ignore: every file made from a committed ``<name>.example`` template (a real secret
    of the developer's: env files, RabbitMQ definitions), and caches."""
    listed = set(names)
    return {name for name in names if f"{name}.example" in listed or name == "__pycache__" or name.endswith(".env")}


def prepare_tree(destination: Path) -> Path:
    """Copy k8s/ without any real secret file, then create each secret file from its template."""
    tree = destination / "k8s"
    shutil.copytree(K8S_DIR, tree, ignore=_secret_files_and_caches)
    for example in tree.rglob("*.example"):
        example.with_suffix("").write_text(example.read_text(encoding="utf-8"), encoding="utf-8")
    return tree


def render(kustomization_dir: Path) -> list[Manifest]:
    result = subprocess.run(
        [KUBECTL, "kustomize", str(kustomization_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {kustomization_dir} failed:\n{result.stderr}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass(frozen=True)
class Rendered:
    """One kustomization's rendered objects, with lookups the tests share."""

    name: str
    objects: list[Manifest]

    def of_kind(self, *kinds: str) -> list[Manifest]:
        return [o for o in self.objects if o["kind"] in kinds]

    def get(self, kind: str, name: str, namespace: str | None = None) -> Manifest | None:
        for o in self.of_kind(kind):
            if o["metadata"]["name"] == name and (namespace is None or namespace_of(o) == namespace):
                return o
        return None

    def one(self, kind: str, name: str) -> Manifest:
        found = self.get(kind, name)
        assert found is not None, f"{self.name}: no {kind}/{name}"
        return found


def namespace_of(obj: Manifest) -> str | None:
    namespace: str | None = obj["metadata"].get("namespace")
    return namespace


def ident(obj: Manifest) -> str:
    return f"{obj['kind']}/{namespace_of(obj) or '-'}/{obj['metadata']['name']}"


def pod_template(obj: Manifest) -> Manifest | None:
    """The pod template of a workload (None for other kinds)."""
    kind = obj["kind"]
    if kind == "CronJob":
        template: Manifest = obj["spec"]["jobTemplate"]["spec"]["template"]
        return template
    if kind in WORKLOAD_KINDS:
        template = obj["spec"]["template"]
        return template
    return None


def workloads(objects: list[Manifest]) -> Iterator[tuple[Manifest, Manifest]]:
    """(workload, pod template) for every workload."""
    for obj in objects:
        template = pod_template(obj)
        if template is not None:
            yield obj, template


def containers(pod_spec: Manifest) -> list[Manifest]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def env_value(container: Manifest, name: str) -> str | None:
    for entry in container.get("env", []):
        if entry["name"] == name and "value" in entry:
            value: str = entry["value"]
            return value
    return None


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels AND every matchExpression); {} matches all."""
    if selector is None:
        return False
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], expression.get("values", [])
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and key in labels and labels[key] in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def load_crd_schema(filename: str, version: str = "v1alpha1") -> Manifest:
    crd = yaml.safe_load((SCHEMA_DIR / filename).read_text(encoding="utf-8"))
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: Manifest = entry["schema"]["openAPIV3Schema"]
            return schema
    raise KeyError(f"{filename} has no version {version}")


def closed_schema(schema: Any) -> Any:
    """The schema with unknown fields refused wherever it lists its properties.

    The API server prunes (or, with strict field validation, rejects) fields a CRD does not declare;
    a plain JSON-schema check would accept a misspelt field silently.
    """
    if isinstance(schema, list):
        return [closed_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_schema(value) for key, value in schema.items()}
    if (
        "properties" in closed
        and "additionalProperties" not in closed
        and not closed.get("x-kubernetes-preserve-unknown-fields", False)
    ):
        closed["additionalProperties"] = False
    return closed


def is_placeholder(value: str) -> bool:
    lowered = value.lower()
    return any(marker in lowered for marker in PLACEHOLDER_MARKERS)
